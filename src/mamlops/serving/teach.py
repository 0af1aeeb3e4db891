"""The teaching routes: new classifiers from a meta-model, kept in a store, and the page.

Given a meta-model (``--meta``), ``POST /classifiers`` adapts it to the labelled images of the
request (``classifier/teach.py``: the code of ``mamlops adapt``), stores the ONNX classifier
under an id made from its content, and ``/classifiers/{id}/predict`` uses it. Adaptation runs
in the thread pool, at most ``TeachLimits.max_teaching`` at once (then 429 with Retry-After), so
``/health`` and other clients' predictions keep answering meanwhile. ``/`` is a page that does
all of it in a browser (``resources/teach.html``).

Without a meta-model every route here but the page answers 404, after the request's own 4xx.
"""

from __future__ import annotations

from datetime import UTC, datetime
from importlib import resources
from typing import Annotated

from fastapi import APIRouter, Query, Request, Response
from fastapi.responses import HTMLResponse, JSONResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from mamlops.classifier.teach import ClassifierStore, TeachError, teach
from mamlops.serving.predict import TopK, classify
from mamlops.serving.schemas import (
    TEACH_BODY,
    TEACH_ERRORS,
    ClassifierInfo,
    ClassifierList,
    MetaModelInfo,
    PredictResponse,
    SupportClass,
    TaughtClassifier,
    bad,
)
from mamlops.serving.state import MaybeTeacher, ServerSettings, teaching_on
from mamlops.serving.uploads import FORM_LIMITS, MAX_PIXELS, Files, decode_images, read_support

router = APIRouter()


def info(store: ClassifierStore, cid: str) -> ClassifierInfo:
    """What the store knows of classifier ``cid``, with the URLs a client follows from it."""
    facts = store.info(cid)
    created = datetime.fromtimestamp(store.created(cid), UTC).isoformat(timespec="seconds")
    base = f"/classifiers/{cid}"
    return ClassifierInfo(
        id=cid,
        labels=facts["labels"],
        created=created,
        predict_url=f"{base}/predict",
        model_sha256=facts["model_sha256"],
        meta_model_sha256=facts.get("meta_model_sha256"),
        support=[
            SupportClass(label=label, images=[f"{base}/support/{n}" for n in names])
            for label, names in zip(facts["labels"], facts["support"], strict=True)
        ],
        provenance=facts["provenance"],
        damaged=facts["damaged"],
    )


@router.get("/", response_class=HTMLResponse, include_in_schema=False)
def page() -> HTMLResponse:
    """The teaching page: draw or upload a few images per class, teach, then predict."""
    html = resources.files("mamlops").joinpath("resources/teach.html").read_text("utf-8")
    return HTMLResponse(html, headers={"Cache-Control": "no-cache"})


@router.get("/meta-model", responses=TEACH_ERRORS)
def meta_model(teacher: MaybeTeacher, settings: ServerSettings) -> MetaModelInfo:
    """The meta-model new classifiers are taught from, and the limits of one request."""
    meta = teaching_on(teacher).meta
    return MetaModelInfo(
        name=meta.path.name,
        sha256=meta.sha256,
        setting=meta.train_config.get("name"),
        dataset=meta.dataset,
        ways=meta.ways,
        image_size=meta.model_cfg.image_size,
        channels=meta.model_cfg.in_channels,
        steps=meta.steps,
        lr=meta.lr,
        max_shots=settings.limits.max_shots,
        max_upload_bytes=settings.max_upload_bytes,
        max_pixels=MAX_PIXELS,
    )


@router.post(
    "/classifiers",
    status_code=201,
    responses=TEACH_ERRORS | {200: {"model": TaughtClassifier, "description": "taught before"}},
    openapi_extra=TEACH_BODY,
)
async def teach_classifier(
    request: Request, response: Response, teacher: MaybeTeacher, settings: ServerSettings
) -> TaughtClassifier:
    """Teach a classifier: adapt the meta-model to the images sent, one form field per
    class named by its label (or one zip of class folders), and store it. 201 with its
    id; 200 when the same images had taught it before."""
    t = teaching_on(teacher)
    meta, limits = t.meta, settings.limits
    max_images = meta.ways * limits.max_shots
    if not t.slots.acquire(blocking=False):
        return JSONResponse(  # type: ignore[return-value]
            {
                "detail": f"busy: {limits.max_teaching} classifiers are being taught "
                "now (the server's --max-teaching); retry in a second"
            },
            status_code=429,
            headers={"Retry-After": "1"},
        )
    try:
        try:
            form = await request.form(max_files=max_images, max_fields=max_images)
        except StarletteHTTPException as exc:  # the parser's own count limits: name ours
            if "Too many files" in str(exc.detail):
                raise bad(413, f"over {max_images} images; at most {max_images}") from None
            if "Too many fields" in str(exc.detail):
                raise bad(
                    413,
                    f"over {max_images} text fields; a teaching form carries image files "
                    "only, in one field per class named by its label",
                ) from None
            raise
        support = await read_support(form, max_images, settings.max_upload_bytes)

        def run() -> tuple:
            images = {label: decode_images(files, meta.dataset) for label, files in support.items()}
            taught = teach(meta, images, limits)
            return taught, *t.store.put(taught)

        taught, cid, new = await run_in_threadpool(run)
        for attempt in range(3):  # a DELETE of the id may come between storing and describing
            try:
                described = info(t.store, cid)
                break
            except TeachError as exc:
                if exc.status != 404 or attempt == 2:
                    raise
                await run_in_threadpool(t.store.put, taught)  # acknowledged: stored again
    finally:
        t.slots.release()
    response.status_code = 201 if new else 200
    response.headers["Location"] = f"/classifiers/{cid}"
    return TaughtClassifier(**described.model_dump(), new=new, teach_ms=1000 * taught.seconds)


@router.get("/classifiers", responses=TEACH_ERRORS)
def list_classifiers(
    teacher: MaybeTeacher,
    limit: Annotated[int, Query(ge=1, le=1000, description="at most this many")] = 100,
    offset: Annotated[int, Query(ge=0, description="skip the newest this many")] = 0,
) -> ClassifierList:
    """The taught classifiers, the most recent first, a page at a time."""
    store = teaching_on(teacher).store
    ids = store.ids()
    page = []
    for cid in ids[offset : offset + limit]:
        try:
            page.append(info(store, cid))
        except TeachError as exc:  # deleted by a concurrent request since ids()
            if exc.status != 404:
                raise
    return ClassifierList(classifiers=page, total=len(ids))


@router.get("/classifiers/{cid}", responses=TEACH_ERRORS)
def get_classifier(teacher: MaybeTeacher, cid: str) -> ClassifierInfo:
    """Labels, support images and provenance of one taught classifier."""
    return info(teaching_on(teacher).store, cid)


@router.delete("/classifiers/{cid}", status_code=204, responses=TEACH_ERRORS)
def delete_classifier(teacher: MaybeTeacher, cid: str) -> Response:
    """Forget a taught classifier (its files and its loaded session)."""
    teaching_on(teacher).store.delete(cid)
    return Response(status_code=204)


@router.get("/classifiers/{cid}/support/{name}", responses=TEACH_ERRORS)
def support_image(teacher: MaybeTeacher, cid: str, name: str) -> Response:
    """One support image as the network saw it (PNG)."""
    return Response(teaching_on(teacher).store.support_png(cid, name), media_type="image/png")


@router.post("/classifiers/{cid}/predict", responses=TEACH_ERRORS, form_limits=FORM_LIMITS)
async def predict_taught(
    teacher: MaybeTeacher, settings: ServerSettings, files: Files, cid: str, top_k: TopK = None
) -> PredictResponse:
    """Classify one or more uploaded images with the taught classifier ``cid``."""
    clf = await run_in_threadpool(teaching_on(teacher).store.get, cid)
    return await classify(files, clf, top_k, settings.default_top_k, cid)
