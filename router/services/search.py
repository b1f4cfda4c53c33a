"""Visual search operations: search by text, example image or id; index, read, delete, stats.

A tenant's key only ever sees its own tenant's entries: filters are scoped here, whatever
the request asks, and another tenant's id answers like a missing one. Both faces send the same
request fields: the query, ``k``, ``filters``, ``params`` (``SearchParams``) and ``tenant`` (an
admin's, or anyone's with auth off; a tenant's key may only name its own).

The index answers with JSON values (it may sit across a Ray hop); they are validated here into
the typed results of router/services/results.py.
"""

from __future__ import annotations

from typing import Any

from retrieval.schemas import SearchFilters, SearchParams, parse_model
from router.auth.principal import Principal, resolve_tenant, tenant_scope
from router.services.backends import SearchBackend
from router.services.common import checked_int64, checked_json_value, checked_tenant, checked_text
from router.services.results import (
    DeletedSearchItem,
    IndexedSearchItem,
    IndexStats,
    SearchItem,
    SearchResponse,
)
from visionroute.errors import BackendUnavailable, InputError, NotFound


class SearchOperations:
    def __init__(self, backend: SearchBackend | None) -> None:
        self.backend = backend

    async def _call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        if self.backend is None:
            raise BackendUnavailable(
                "visual search is not enabled in this deployment (retrieval.enabled)", field="retrieval"
            )
        return await self.backend.call(method, *args, **kwargs)

    @staticmethod
    def scoped_filters(
        caller: Principal | None, filters: dict[str, Any] | None, tenant: str | None = None
    ) -> dict[str, Any] | None:
        scope = tenant_scope(caller)
        if scope is not None:
            return {**(filters or {}), "tenant": scope}
        if tenant is not None:
            return {**(filters or {}), "tenant": tenant}
        return filters

    @staticmethod
    def _checked(filters: Any, params: Any, text: Any = None, image: Any = None) -> None:
        """Shapes the backend cannot take, refused here (before any hop or embedding work)."""
        for name, value, model in (("filters", filters, SearchFilters), ("params", params, SearchParams)):
            if value is not None and not isinstance(value, dict):
                raise InputError(f"{name} must be a JSON object, got {type(value).__name__}", field=name)
            if value is not None:
                checked_json_value(value, name)
                parse_model(model, value, name)  # the index checks again; this spares the hop
        if text is not None:
            if not isinstance(text, str):
                raise InputError(f"text must be a string, got {type(text).__name__}", field="text")
            checked_text(text, "text")
        if image is not None and not isinstance(image, (bytes, bytearray)):
            raise InputError(f"image must be bytes, got {type(image).__name__}", field="image")

    async def get(self, caller: Principal | None, item_id: int) -> SearchItem:
        """The item, or NotFound when it does not exist or belongs to another tenant."""
        item = SearchItem.model_validate(await self._call("get", checked_int64(item_id, "id")))
        scope = tenant_scope(caller)
        if scope is not None and item.metadata.tenant != scope:
            raise NotFound(f"no indexed item {item_id}", field="id")
        return item

    async def search(
        self,
        caller: Principal | None,
        *,
        text: str | None = None,
        image: bytes | None = None,
        item_id: int | None = None,
        k: int = 10,
        filters: dict[str, Any] | None = None,
        params: dict[str, Any] | None = None,
        tenant: str | None = None,
    ) -> SearchResponse:
        """One search: exactly one of text, image or item_id. ``tenant`` narrows the search to
        one tenant's entries: an admin's (or anyone's with auth off) to any, a tenant's key only
        to its own (another is PermissionDenied, as for analyze); checked on both faces alike."""
        given = [n for n, v in (("text", text), ("image", image), ("id", item_id)) if v is not None]
        if len(given) != 1:
            raise InputError(f"give exactly one of text, image or id; got {given or 'none'}", field="query")
        self._checked(filters, params, text, image)
        if tenant is not None:
            resolve_tenant(caller, checked_tenant(tenant))  # a tenant's key: its own tenant only
        if item_id is not None:
            item_id = checked_int64(item_id, "id")
        options = {"k": k, "filters": self.scoped_filters(caller, filters, tenant), "params": params}
        if text is not None:
            answer = await self._call("search_text", text, **options)
        elif image is not None:
            answer = await self._call("search_image", image, **options)
        else:
            await self.get(caller, item_id)
            answer = await self._call("search_by_id", item_id, **options)
        return SearchResponse.model_validate(answer)

    async def index(
        self, caller: Principal | None, image: bytes, metadata: dict[str, Any] | None
    ) -> IndexedSearchItem:
        if metadata is not None and not isinstance(metadata, dict):
            raise InputError(
                f"metadata must be a JSON object, got {type(metadata).__name__}", field="metadata"
            )
        if metadata is not None:
            checked_json_value(metadata, "metadata")
        scope = tenant_scope(caller)
        if scope is not None:  # entries belong to the caller's tenant
            metadata = {**(metadata or {}), "tenant": scope}
        return IndexedSearchItem(await self._call("index_image", image, metadata))

    async def delete(self, caller: Principal | None, item_id: int) -> DeletedSearchItem:
        item_id = checked_int64(item_id, "id")
        await self.get(caller, item_id)
        await self._call("delete", item_id)
        return DeletedSearchItem(item_id)

    async def stats(self, caller: Principal | None) -> IndexStats:
        """Admins (and auth off) get the whole index's figures and its directory; a tenant's
        key gets its own entry count only: no other tenant's numbers, no server paths."""
        scope = tenant_scope(caller)
        if scope is None:
            return IndexStats.from_report(await self._call("stats"))
        return IndexStats.from_report(await self._call("stats", tenant=scope))
