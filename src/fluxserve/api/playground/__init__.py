"""The web playground: a page at ``/playground/`` (``/`` points there) that builds its form from
``/openapi.json``, so every model and field the API has appears without changes here.

Plain static files in this folder, no build step. The key stays in the browser and goes only to this server,
in the ``TT-API-KEY`` header of the reseller routes the page calls like any client; the one route of its own
is the gallery's list of the key's recent jobs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query
from fastapi.responses import FileResponse, RedirectResponse

from fluxserve.accounts.keys import ApiKey
from fluxserve.api.auth import reseller_key
from fluxserve.api.deps import Services, get_services
from fluxserve.errors import Refused
from fluxserve.jobs.reports import recent_jobs

HERE = Path(__file__).parent
# The page's files and their types; nothing else in the folder is served.
FILES = {"index.html": "text/html", "app.js": "text/javascript", "style.css": "text/css"}

router = APIRouter(tags=["playground"])


@router.get("/", include_in_schema=False)
@router.get("/playground", include_in_schema=False)
def to_playground() -> RedirectResponse:
    return RedirectResponse("/playground/")


@router.get(
    "/playground/jobs",
    summary="The key's recent jobs, newest first, for the playground's gallery (TT-API-KEY)",
)
def jobs(
    key: Annotated[ApiKey, Depends(reseller_key)],
    services: Annotated[Services, Depends(get_services)],
    limit: Annotated[int, Query(ge=1, le=50)] = 12,
) -> dict[str, Any]:
    lines = recent_jobs(services.keys.database, key_id=key.id, limit=limit)
    return {
        "jobs": [
            {
                "jobId": line.id,
                "mode": line.model,
                "status": line.status.value,
                "prompt": line.prompt,
                "seed": line.seed,
                "size": line.size,
                "imageUrl": services.result_url(line.result_key),
                "createdAt": line.created_at.isoformat(),
            }
            for line in lines
        ]
    }


@router.get("/playground/", include_in_schema=False)
@router.get("/playground/{name}", include_in_schema=False)
def page(name: str = "index.html") -> FileResponse:
    if name not in FILES:
        raise Refused(404, f"/playground/{name}: no such file")
    return FileResponse(HERE / name, media_type=FILES[name], headers={"Cache-Control": "no-cache"})
