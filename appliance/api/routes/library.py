"""The model library over HTTP: pull (NDJSON progress, shaped like Ollama's /api/pull), remove,
and the installed models with the fit answer for this machine.

Hostile input is normal input: the body is a bounded pydantic model; a REF or id that could name
a path outside the models folder is refused with 400; local files are imported over the API only
from inside the models folder. Errors found before the first byte (bad REF, unknown repo, gated,
no disk space) are a plain JSON error with their status; later ones are the stream's last line.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from appliance.api.deps import ManagerDep, ProbeDep, SettingsDep
from appliance.context_sizing import listing_context
from appliance.library.catalog import RECOMMENDED
from appliance.library.errors import ModelInUse
from appliance.library.fit import fit_size, read_machine
from appliance.library.jobs import PullJobs
from appliance.library.listing import describe_all
from appliance.library.manifest import split_id
from appliance.library.pull import Library
from appliance.library.refs import MAX_REF, check_model_id

router = APIRouter()


class PullBody(BaseModel):
    """Ollama's pull body (`model`, or its older `name`; `stream`) plus our `quant`."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = Field(None, max_length=MAX_REF)
    name: str | None = Field(None, max_length=MAX_REF)
    quant: str | None = Field(None, max_length=40)
    revision: str | None = Field(None, max_length=100)
    stream: bool = True
    force: bool = False
    insecure: bool | None = None  # Ollama's; meaningless here


async def _jobs(request: Request) -> PullJobs:
    """The daemon's pulls, made on first use (no lifespan work: the daemon starts as fast).
    Async on purpose: FastAPI runs a plain-def dependency on a worker thread, and concurrent
    first requests (two pulls and a listing) each made their own PullJobs there, the last one
    stored winning: a pull ran where /api/library never looked, and two clients got two
    downloads. On the event loop the check and the store cannot interleave (the constructor
    does no I/O: Hub resolves its endpoint on first use)."""
    state = request.app.state
    jobs = getattr(state, "pull_jobs", None)
    if jobs is None:
        settings = state.settings
        models_dir = settings.models_dir.expanduser()
        jobs = PullJobs(Library(models_dir, local_root=models_dir))
        jobs.on_installed = lambda _: state.registry.scan()
        state.pull_jobs = jobs
    return jobs


JobsDep = Annotated[PullJobs, Depends(_jobs)]


def _loaded_id(manager: Any) -> str | None:
    """The resident model's library id (a split model's parts share one)."""
    model = manager.current
    if model is None:
        return None
    return split_id(model.entry.path.stem)[0]


@router.post("/api/models/pull", response_model=None)
async def api_pull(body: PullBody, jobs: JobsDep) -> Any:
    ref = body.model or body.name
    if not ref:
        from appliance.errors import InvalidValue

        raise InvalidValue("give the model to pull as `model`", param="model")
    plan = await asyncio.to_thread(jobs.library.plan, ref, body.quant, body.revision)
    if jobs.active(plan.model_id) is None and not plan.up_to_date:
        await asyncio.to_thread(jobs.library.check_space, plan)
    job = jobs.start_or_join(plan, force=body.force)
    if not body.stream:
        lines = [line async for line in job.follow()]
        last = lines[-1] if lines else {"status": "success"}
        if job.error is not None:
            raise job.error
        return last

    async def lines() -> AsyncIterator[bytes]:
        async for line in job.follow():
            yield (json.dumps(line) + "\n").encode()

    return StreamingResponse(lines(), media_type="application/x-ndjson")


@router.post("/api/pull", response_model=None)
async def ollama_pull(body: PullBody, jobs: JobsDep) -> Any:
    """Ollama's name for a pull (its client calls it); same job, same progress lines."""
    return await api_pull(body, jobs)


class DeleteBody(BaseModel):
    """Ollama's delete body."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = Field(None, max_length=MAX_REF)
    name: str | None = Field(None, max_length=MAX_REF)


@router.delete("/api/delete")
async def ollama_delete(body: DeleteBody, jobs: JobsDep, manager: ManagerDep) -> dict[str, Any]:
    """Ollama's delete: refused while the model is loaded, as `appliance rm` without --force."""
    name = body.model or body.name or ""
    return await api_delete(name.removesuffix(":latest").replace(":", "-"), jobs, manager)


@router.delete("/api/models/{model_id}")
async def api_delete(model_id: str, jobs: JobsDep, manager: ManagerDep,
                     force: Annotated[bool, Query()] = False) -> dict[str, Any]:
    mid = check_model_id(model_id)
    if jobs.active(mid) is not None:
        raise ModelInUse(f"{mid} is being pulled; wait for the pull to end", param="id")
    unloaded = False
    if mid in (_loaded_id(manager), (manager.target or "").lower()):
        if not force:
            raise ModelInUse(f"{mid} is loaded; unload it first, or remove it with force",
                             "pass --force (force=true) to unload it first", "id")
        await manager.unload(f"the model {mid} was removed")
        unloaded = True
    model = await asyncio.to_thread(jobs.library.remove, mid)
    request_registry = manager.registry
    await asyncio.to_thread(request_registry.scan)
    return {"id": model.id, "removed": [f.name for f in model.files], "size": model.removed_bytes,
            "unloaded": unloaded}


def _library_view(settings: Any, probe: Any, pulls: list[dict[str, Any]]) -> dict[str, Any]:
    n_ctx_total = listing_context(settings.context_length) * settings.parallel
    machine = read_machine(probe, n_ctx_total=n_ctx_total,
                           margin_mib=settings.vram_margin_mib)
    models_dir = settings.models_dir.expanduser()
    forced = {mid: o.gpu_layers for mid, o in settings.models.items()}
    installed = describe_all(models_dir, machine, forced)
    have = {m["id"] for m in installed}
    recommended = []
    for r in RECOMMENDED:
        fit = fit_size(r.size, machine)
        recommended.append({"ref": r.ref, "label": r.label, "size": r.size, **fit.describe(),
                            "installed": any(i.startswith(r.ref.split("/")[1].lower()
                                                          .removesuffix("-gguf")) for i in have)})
    return {"models_dir": str(models_dir), "models": installed, "pulls": pulls,
            "recommended": recommended, "device": machine.device}


@router.get("/api/library")
async def api_library(settings: SettingsDep, probe: ProbeDep, jobs: JobsDep) -> dict[str, Any]:
    # The jobs are read on the event loop, which alone changes them; the rest off it.
    return await asyncio.to_thread(_library_view, settings, probe, jobs.describe())
