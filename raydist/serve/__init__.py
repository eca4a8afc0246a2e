"""Serving stage: Ray Serve hosts a raydist artifact behind an OpenAI-compatible FastAPI app.

    raydist serve runs/quickstart/artifact                      # local Ray, http://127.0.0.1:8000/v1
    serve run raydist.serve:app_builder artifact=runs/quickstart/artifact

Names are resolved lazily so that importing the schemas or the engine does not import Ray Serve.
"""

from __future__ import annotations

from raydist._lazy import lazy_attributes

_WHERE = {
    "app_builder": "raydist.serve.app",
    "build_app": "raydist.serve.app",
    "run_serve": "raydist.serve.app",
    "BatchGenerator": "raydist.serve.engine",
    "OpenAIService": "raydist.serve.service",
    "build_fastapi_app": "raydist.serve.http",
}
__all__ = list(_WHERE)
__getattr__, __dir__ = lazy_attributes(globals(), _WHERE)
