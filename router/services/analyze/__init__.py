"""Analyse one image: a declared pipeline of small stages over one typed request context.

- context.py: ``ImageRequest`` (what the faces hand in), ``RequestContext`` (what the stages
  read and write), the ``Stage`` contract;
- pipeline.py: the stages in order, declared in one place (``analyze_pipeline``);
- stages.py: decode, arm, file pixels, review selection, privacy, store, search index,
  metrics, drift (the cascade's own stages are in cascades/pipeline.py);
- budget.py: budgets and degrade modes (``BudgetGuard``), wrapping the paid stages;
- rollout.py: a rollout's evidence after the response (canary cost, the shadow run);
- service.py: ``AnalyzeService.analyze(request, caller) -> Analysis``;
- response.py: ``response_body``, the answer both faces return.
"""

from router.services.analyze.context import ImageRequest, RequestContext
from router.services.analyze.response import response_body
from router.services.analyze.service import AnalyzeService

__all__ = ["AnalyzeService", "ImageRequest", "RequestContext", "response_body"]
