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
    plan, quantization, dtype, max_len = plan_for(settings, config)
    print(f"model: {source}  quantization: {quantization}  dtype: {dtype}  max model len: {max_len}")
    print(describe_plan(plan))
    return 0


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
    from glm4.loading import load_weights

    delay = float(os.environ.get(TEST_LOAD_DELAY, 0) or 0) if settings.test_hooks else 0.0
    if delay:
        log.warning("%s: loading takes %.1f s longer (test hook)", TEST_LOAD_DELAY, delay)
        time.sleep(delay)
    loaded = load_weights(prepared)
    engines = [LocalEngine(model, loaded.tokenizer, loaded.info, max_num_seqs=settings.max_num_seqs,
                           max_queue=settings.max_queue, test_hooks=settings.test_hooks, compile=settings.compile)
               for model in loaded.models]
    return engines[0] if len(engines) == 1 else ReplicatedEngine(engines)


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
    except (ModelLoadError, PlacementError, UnsafeSettings) as error:
        log.error("%s", error)
        return 2
    return serve(settings, StartupApp(settings, lambda: build_engine(settings, prepared), create_app))


if __name__ == "__main__":
    sys.exit(main())
