"""deploy/Dockerfile, checked statically (no container engine runs on the build machines): its
instructions parsed, then the properties the image must have: pinned bases, the lock files
installed with hashes, every package copied, the prepared models baked in where the service
looks, a non-root user, a HEALTHCHECK on /healthz."""

from __future__ import annotations

import json
import re
import shlex
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DOCKERFILE = REPO / "deploy" / "Dockerfile"


@dataclass
class Instruction:
    keyword: str
    args: str
    line: int

    def words(self) -> list[str]:
        return json.loads(self.args) if self.args.startswith("[") else shlex.split(self.args)


@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[Instruction]

    def all(self, keyword: str) -> list[Instruction]:
        return [i for i in self.instructions if i.keyword == keyword]


def parse(text: str) -> tuple[dict[str, str], list[Stage]]:
    """(global ARG defaults, stages): continuation lines joined, comments and blanks dropped."""
    instructions, pending, start = [], "", 0
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if pending and line.startswith("#"):
            continue  # a comment inside a continued instruction
        start = start if pending else number
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        keyword, _, args = (pending + line).partition(" ")
        instructions.append(Instruction(keyword.upper(), args.strip(), start))
        pending = ""
    assert not pending, "the Dockerfile ends inside a continued line"
    args: dict[str, str] = {}
    stages: list[Stage] = []
    for instruction in instructions:
        if instruction.keyword == "FROM":
            words = instruction.args.split()
            name = words[2] if len(words) == 3 and words[1].upper() == "AS" else None
            stages.append(Stage(words[0], name, []))
        elif not stages and instruction.keyword == "ARG":
            key, _, default = instruction.args.partition("=")
            args[key] = default
        else:
            assert stages, f"line {instruction.line}: {instruction.keyword} before FROM"
            stages[-1].instructions.append(instruction)
    return args, stages


def resolve(ref: str, args: dict[str, str]) -> str:
    return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: args[m.group(1) or m.group(2)], ref)


@pytest.fixture(scope="module")
def dockerfile() -> tuple[dict[str, str], list[Stage]]:
    return parse(DOCKERFILE.read_text())


def test_every_base_image_is_pinned(dockerfile):
    args, stages = dockerfile
    names = {stage.name for stage in stages if stage.name}
    for stage in stages:
        ref = resolve(stage.base, args)
        if ref in names:
            continue  # an earlier stage
        image, _, digest = ref.partition("@")
        tag = image.rsplit("/", 1)[-1].partition(":")[2]
        assert digest.startswith("sha256:") or (tag and tag != "latest"), f"unpinned base image {ref!r}"
        assert tag != "latest", ref
        if not digest:  # a tag pin names a patch release, not a moving minor (3.11-slim)
            assert re.match(r"\d+\.\d+\.\d+", tag), f"{ref!r}: pin a patch release or a digest"


def test_the_final_stage_runs_as_a_non_root_user(dockerfile):
    _, stages = dockerfile
    final = stages[-1]
    users = final.all("USER")
    assert users, "the final stage sets no USER: the image would run as root"
    user = users[-1].args.split(":")[0]
    assert user not in ("root", "0")
    last_user_line = users[-1].line
    for keyword in ("CMD", "ENTRYPOINT", "HEALTHCHECK"):
        assert all(i.line > last_user_line for i in final.all(keyword)), f"{keyword} before USER"


def test_dependencies_come_from_the_lock_files_with_hashes(dockerfile):
    _, stages = dockerfile
    build = stages[0]
    copied = [word for i in build.all("COPY") for word in i.words()[:-1]]
    bootstrap = (REPO / "scripts" / "bootstrap.sh").read_text()
    locks = re.findall(
        r'"\$repo/(requirements/[\w.-]+\.txt)"', bootstrap.split("locks=(", 1)[1].split(")", 1)[0]
    )
    assert locks, "scripts/bootstrap.sh names no lock files"
    runs = " && ".join(i.args for stage in stages for i in stage.all("RUN"))
    installs = [cmd.strip() for cmd in re.split(r"&&|;", runs) if re.search(r"\bpip install\b", cmd)]
    for lock in locks:  # the locks the venv is built from, copied and installed the same way
        assert (REPO / lock).is_file() and lock in copied, lock
        assert any(f"-r {lock}" in cmd and "--require-hashes" in cmd for cmd in installs), lock
    for cmd in installs:  # anything else pip installs is the project itself, without dependencies
        assert "--require-hashes" in cmd or (cmd.endswith(" .") and "--no-deps" in cmd), cmd


def test_every_package_and_config_the_service_needs_is_copied(dockerfile):
    _, stages = dockerfile
    sources = {
        word.rstrip("/")
        for stage in stages
        for i in stage.all("COPY")
        if "--from" not in i.args
        for word in i.words()[:-1]
    }
    for source in sources:
        assert (REPO / source).exists(), f"COPY {source}: no such path in the repository"
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    packages = [p.rstrip("*") for p in project["tool"]["setuptools"]["packages"]["find"]["include"]]
    assert set(packages) <= sources, f"packages not copied: {set(packages) - sources}"
    assert {"pyproject.toml", project["project"]["readme"], "serve_config.cluster.yaml"} <= sources
    ignore_file = (REPO / "deploy" / "Dockerfile.dockerignore").read_text().splitlines()
    ignored = [line.strip() for line in ignore_file if line.strip() and not line.startswith("#")]
    assert "**/.venv*" in ignored and not set(packages) & set(ignored)


def test_the_prepared_models_are_baked_in_where_the_service_looks(dockerfile):
    _, stages = dockerfile
    build, final = stages[0], stages[-1]
    prepared = [re.search(r"visionroute models prepare --dir (\S+)", i.args) for i in build.all("RUN")]
    (models_dir,) = [m.group(1) for m in prepared if m]
    copies = [i.words() for i in final.all("COPY") if i.args.startswith(f"--from={build.name}")]
    assert [f"--from={build.name}", models_dir, models_dir] in copies
    env = " ".join(i.args for i in final.all("ENV"))
    home = re.search(r"VISIONROUTE_HOME=(\S+)", env).group(1)
    assert f"{home}/models" == models_dir  # visionroute.paths.models_dir() in the running image


def test_the_healthcheck_asks_the_liveness_endpoint(dockerfile):
    _, stages = dockerfile
    final = stages[-1]
    (check,) = final.all("HEALTHCHECK")
    assert "CMD" in check.args and "/healthz" in check.args
    port = re.search(r"127\.0\.0\.1:(\d+)/healthz", check.args).group(1)
    exposed = {word for i in final.all("EXPOSE") for word in i.words()}
    assert port in exposed


def test_the_parser_reads_what_it_checks():
    args, stages = parse(
        "ARG BASE=python:3.11.14-slim\nFROM ${BASE} AS build\n# note\nRUN a \\\n  # inside\n && b\n"
        'FROM build\nUSER 1000\nCMD ["x", "y"]\n'
    )
    assert args == {"BASE": "python:3.11.14-slim"} and [s.name for s in stages] == ["build", None]
    assert stages[0].all("RUN")[0].args == "a  && b" and stages[1].all("CMD")[0].words() == ["x", "y"]
