"""Entry point: settings → checks and placement plan → listen (503 "loading") → load → engine → create_app.

    python app.py                      # real GLM-4 in 4-bit on a CUDA machine, the embedded tiny GLM-4 elsewhere
    python app.py --plan-only --simulate-gpus "RTX 2080 Ti:11GiB:7.5,GTX 1070:8GiB:6.1"

Refusals (unsafe flags, a missing model, an impossible placement) exit with code 2 before anything listens.
The server then listens at once and answers 503 "loading" until the weights are in (glm4/startup.py).
Test-only: with --test-hooks, the environment variable GLM4_TEST_LOAD_DELAY=<seconds> makes loading take
that much longer, so tests can watch the loading answers (tests/test_startup.py).
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
    plan, quantization, dtype, slots = plan_for(settings, config)
    print(f"model: {source}  quantization: {quantization}  dtype: {dtype}  max model len: {slots.max_model_len}")
    print(describe_plan(plan))
    print(f"KV {slots.describe()}")
    for note in slots.notes:
        print(f"  {note}")
    print(describe_prefix_reuse(settings, slots, replicas=len(plan.replicas)))
    for placement in plan_embedding_models(settings):
        print(placement.describe())
    return 0


def describe_prefix_reuse(settings, slots, replicas: int) -> str:
    """What --plan-only says about prefix reuse: conversations kept warm on the GPU and in host memory."""
    from glm4.loading import host_cache_bytes

    if settings.no_enable_prefix_caching:
        return "Prefix reuse: off (--no-enable-prefix-caching): every prompt is prefilled from token 0"
    full = sum(1 for capacity in slots.capacities if capacity == slots.max_model_len)
    host = host_cache_bytes(settings, replicas)
    host_tokens = host // slots.kv_bytes_per_token if slots.kv_bytes_per_token else 0
    return (f"Prefix reuse: finished requests keep their KV in their slots, so up to {len(slots.capacities)} "
            f"conversations stay warm in the slots{' per replica' if replicas > 1 else ''} ({full} of full length, "
            f"{slots.max_model_len} tokens); the host cache (--cache-ram {host / 2**30:.1f} GiB"
            f"{' per replica' if replicas > 1 else ''}) keeps {host_tokens} tokens more, "
            f"{host_tokens // max(1, slots.max_model_len)} conversation(s) of full length.")


TEST_LOAD_DELAY = "GLM4_TEST_LOAD_DELAY"  # seconds; honoured only with --test-hooks


def prepare_engine(settings):
    """The fast part of loading (config, placement plan): its refusals come before the server listens."""
    if settings.backend == "upstream":
        return None
    from glm4.loading import prepare_load

    return prepare_load(settings)


def build_engine(settings, prepared):
    """The one engine every front end shares (the slow part: the weights)."""
    if settings.backend == "upstream":
        from glm4.engine.upstream import UpstreamEngine

        return UpstreamEngine(settings)
    from glm4.engine.local import LocalEngine
    from glm4.engine.replicated import ReplicatedEngine
    from glm4.loading import host_cache_bytes, load_weights

    delay = float(os.environ.get(TEST_LOAD_DELAY, 0) or 0) if settings.test_hooks else 0.0
    if delay:
        log.warning("%s: loading takes %.1f s longer (test hook)", TEST_LOAD_DELAY, delay)
        time.sleep(delay)
    loaded = load_weights(prepared)
    cache_bytes = host_cache_bytes(settings, replicas=len(loaded.models))
    engines = [LocalEngine(model, loaded.tokenizer, loaded.info, max_queue=settings.max_queue,
                           test_hooks=settings.test_hooks, compile=settings.compile,
                           slot_capacities=loaded.slots.capacities,
                           prefix_caching=not settings.no_enable_prefix_caching, cache_ram_bytes=cache_bytes,
                           cuda_graphs=not settings.enforce_eager)
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
    from glm4.server import is_loopback

    if not is_loopback(settings.host) and not settings.api_key:
        log.warning("Listening on %s without --api-key: anyone who can reach this port can use the model. "
                    "Set --api-key (and --ui-auth) or bind 127.0.0.1; see docs/SECURITY.md.", settings.host)
    if settings.test_hooks:
        log.warning("--test-hooks is on: any client can inject faults into generation steps (test_fault) and "
                    "force the model's replies (test_force_output). For tests only, never in production.")


def serve(settings, startup) -> int:
    """uvicorn over the StartupApp; returns the exit code (2 when the model failed to load)."""
    import uvicorn

    from glm4.server import AcceptPrefixedPaths

    class DrainingServer(uvicorn.Server):
        """First SIGTERM/SIGINT: refuse new /v1 work with 503, let running requests finish, then exit 0."""

        draining_since: float | None = None

        def handle_exit(self, sig, frame):
            if self.draining_since is not None or startup.app is None:  # a second signal, or still loading
                return super().handle_exit(sig, frame)
            self.draining_since = time.monotonic()
            startup.app.state.status = "draining"
            log.info("Shutting down: finishing running requests (up to %.0f s), refusing new ones",
                     settings.drain_timeout)
            asyncio.get_event_loop().create_task(self._drain())

        async def _drain(self):
            engine = startup.app.state.engine
            while time.monotonic() - self.draining_since < settings.drain_timeout:
                stats = engine.stats()
                if not stats.get("running") and not stats.get("waiting"):
                    break
                await asyncio.sleep(0.1)
            self.should_exit = True

    app = AcceptPrefixedPaths(startup, settings.root_path) if settings.root_path else startup
    config = uvicorn.Config(app, host=settings.host, port=settings.port, root_path=settings.root_path,
                            log_level=settings.log_level.lower(), timeout_graceful_shutdown=5,
                            access_log=settings.log_level.lower() == "debug")
    server = DrainingServer(config)

    def stop() -> None:
        server.should_exit = True

    startup.on_failure = stop
    server.run()
    return startup.exit_code


def main(argv: list[str] | None = None) -> int:
    from glm4.settings import parse_settings

    settings = parse_settings(argv)
    configure_logging(settings.log_level)
    from glm4.loading import ModelLoadError
    from glm4.placement import PlacementError
    from glm4.server import UnsafeSettings, check_safe_settings, create_app
    from glm4.startup import StartupApp

    try:
        if settings.plan_only:
            return plan_only(settings)
        check_safe_settings(settings)  # before loading a model: a refusal should take a second, not minutes
        warn_if_exposed(settings)
        prepared = prepare_engine(settings)
        embedding_plan = plan_embedding_models(settings)  # before the chat weights take the memory it plans for
    except (ModelLoadError, PlacementError, UnsafeSettings) as error:
        log.error("%s", error)
        return 2
    embeddings = []

    def build() -> object:
        engine = build_engine(settings, prepared)
        embeddings.append(load_embedding_models(settings, embedding_plan))
        return engine

    def make_app(settings_, engine):
        return create_app(settings_, engine, embeddings=embeddings[0] if embeddings else None)

    try:
        return serve(settings, StartupApp(settings, build, make_app))
    finally:
        for service in embeddings:
            if service is not None:
                service.close()


if __name__ == "__main__":
    sys.exit(main())
