"""Entry point: settings → load model → engine → create_app → uvicorn.

    python app.py                      # real GLM-4 in 4-bit on a CUDA machine, the embedded tiny GLM-4 elsewhere
    python app.py --plan-only --simulate-gpus "RTX 2080 Ti:11GiB:7.5,GTX 1070:8GiB:6.1"
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import time

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no phoning home from a local server

log = logging.getLogger("glm4")


def configure_logging(level: str) -> None:
    logging.basicConfig(level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # gradio's own requests, noise at info level


def plan_only(settings) -> int:
    from glm4.loading import load_config, plan_for, resolve_model_source
    from glm4.placement import describe_plan

    source = resolve_model_source(settings.model, has_gpu=bool(settings.simulate_gpus) or None)
    config = load_config(source, settings)
    plan, quantization, dtype, max_len = plan_for(settings, config)
    print(f"model: {source}  quantization: {quantization}  dtype: {dtype}  max model len: {max_len}")
    print(describe_plan(plan))
    for placement in plan_embedding_models(settings):
        print(placement.describe())
    return 0


def build_engine(settings):
    """The one engine every front end shares."""
    if settings.backend == "upstream":
        from glm4.engine.upstream import UpstreamEngine

        return UpstreamEngine(settings)
    from glm4.engine.local import LocalEngine
    from glm4.engine.replicated import ReplicatedEngine
    from glm4.loading import load_model

    loaded = load_model(settings)
    engines = [LocalEngine(model, loaded.tokenizer, loaded.info, max_num_seqs=settings.max_num_seqs,
                           max_queue=settings.max_queue, test_hooks=settings.test_hooks, compile=settings.compile)
               for model in loaded.models]
    return engines[0] if len(engines) == 1 else ReplicatedEngine(engines)


def plan_embedding_models(settings):
    """Where --embedding-model / --rerank-model go, beside the chat model's plan; [] when neither is set."""
    if not (settings.embedding_model or settings.rerank_model):
        return []
    from glm4.embeddings import chat_plan_and_gpus, plan_embedding_models as plan

    return plan(settings, *chat_plan_and_gpus(settings))


def load_embedding_models(settings, placements):
    if not placements:
        return None
    from glm4.embeddings import load_embedding_service

    return load_embedding_service(settings, placements)


def warn_if_exposed(settings) -> None:
    if settings.host not in ("127.0.0.1", "localhost", "::1") and not settings.api_key:
        log.warning("Listening on %s without --api-key: anyone who can reach this port can use the model. "
                    "Set --api-key (and --ui-auth) or bind 127.0.0.1; see docs/SECURITY.md.", settings.host)


def serve(settings, app) -> None:
    import uvicorn

    class DrainingServer(uvicorn.Server):
        """First SIGTERM/SIGINT: refuse new /v1 work with 503, let running requests finish, then exit 0."""

        draining_since: float | None = None

        def handle_exit(self, sig, frame):
            if self.draining_since is not None:  # a second signal: stop now
                return super().handle_exit(sig, frame)
            self.draining_since = time.monotonic()
            app.state.status = "draining"
            log.info("Shutting down: finishing running requests (up to %.0f s), refusing new ones",
                     settings.drain_timeout)
            asyncio.get_event_loop().create_task(self._drain())

        async def _drain(self):
            engine = app.state.engine
            while time.monotonic() - self.draining_since < settings.drain_timeout:
                stats = engine.stats()
                if not stats.get("running") and not stats.get("waiting"):
                    break
                await asyncio.sleep(0.1)
            self.should_exit = True

    config = uvicorn.Config(app, host=settings.host, port=settings.port, root_path=settings.root_path,
                            log_level=settings.log_level.lower(), timeout_graceful_shutdown=5,
                            access_log=settings.log_level.lower() == "debug")
    DrainingServer(config).run()


def main(argv: list[str] | None = None) -> int:
    from glm4.settings import parse_settings

    settings = parse_settings(argv)
    configure_logging(settings.log_level)
    from glm4.loading import ModelLoadError
    from glm4.placement import PlacementError
    from glm4.server import UnsafeSettings, check_ui_protection, create_app

    try:
        if settings.plan_only:
            return plan_only(settings)
        check_ui_protection(settings)  # before loading a model: a refusal should take a second, not minutes
        warn_if_exposed(settings)
        embedding_plan = plan_embedding_models(settings)  # before the chat weights take the memory it plans for
        engine = build_engine(settings)
        embeddings = load_embedding_models(settings, embedding_plan)
    except (ModelLoadError, PlacementError, UnsafeSettings) as error:
        log.error("%s", error)
        return 2
    app = create_app(settings, engine, embeddings=embeddings)
    ui = "off" if settings.no_ui else f"http://{settings.host}:{settings.port}{settings.root_path}/"
    log.info("Serving %s: API http://%s:%d%s/v1 · UI %s", engine.info.name, settings.host, settings.port,
             settings.root_path, ui)
    try:
        serve(settings, app)
    finally:
        if embeddings is not None:
            embeddings.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
