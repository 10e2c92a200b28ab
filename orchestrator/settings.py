"""Settings only the orchestrator reads (environment, then ``.env`` like every settings class of the project;
``MUSETALK_`` prefix). The shared ones — the internal API key, storage, SSRF policy — stay in
:class:`tasks.settings.Settings`."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings

from tasks.settings import read_settings, settings_config

# Route kinds the ``auto`` policy may try, in the order an operator lists them.
ROUTE_KINDS = ("buffer", "gpu", "salad")


class OrchestratorSettings(BaseSettings):
    # the project's one source configuration (environment, then the same .env file as every command)
    model_config = settings_config()

    # Public API keys, comma-separated; a request must carry one as ``Authorization: Bearer <key>``.
    musetalk_api_keys: SecretStr | None = None
    # A buffer worker without a heartbeat for this long is offline and its job goes back to the queue.
    musetalk_worker_offline_sec: float = Field(30.0, gt=0)
    # Claims of one job (a requeue after a lost worker counts); past this the job fails for good.
    musetalk_max_attempts: int = Field(3, ge=1)
    # The ``auto`` route tries these in order (DESIGN §11: idle buffer, gpu pool with a worker, Salad).
    musetalk_route_policy: str = "buffer,gpu,salad"
    # How often the orchestrator looks for offline workers and newly finished runs.
    musetalk_sweep_interval_sec: float = Field(2.0, gt=0)
    # The benchmark results and recorded prices that pick the Salad class.
    musetalk_gpu_targets: Path = Path("gpu_targets.json")
    musetalk_salad_prices: Path | None = Path("salad_prices.json")
    # A Salad class is eligible for ``auto`` when its measured real-time factor is at most this.
    musetalk_salad_target_rtf: float = Field(1.0, gt=0)
    # Prefect writes in flight at once from one orchestrator process; 0 = no limit (PostgreSQL). An SQLite
    # Prefect server has one writer: 1 turns "database is locked" failures into a short queue here.
    musetalk_prefect_max_writes: int = Field(0, ge=0)
    # Same Idempotency-Key within this window → the same job.
    musetalk_idempotency_window_sec: float = Field(24 * 3600.0, gt=0)

    @field_validator("musetalk_route_policy")
    @classmethod
    def _known_kinds(cls, value: str) -> str:
        kinds = [k.strip() for k in value.split(",") if k.strip()]
        unknown = [k for k in kinds if k not in ROUTE_KINDS]
        if unknown or not kinds:
            raise ValueError(f"MUSETALK_ROUTE_POLICY takes a list of {', '.join(ROUTE_KINDS)}; got {value!r}")
        return ",".join(kinds)

    @property
    def route_policy(self) -> list[str]:
        return self.musetalk_route_policy.split(",")

    @property
    def api_keys(self) -> list[str]:
        raw = self.musetalk_api_keys.get_secret_value() if self.musetalk_api_keys else ""
        return [k.strip() for k in raw.split(",") if k.strip()]


@lru_cache(maxsize=1)
def get_orchestrator_settings() -> OrchestratorSettings:
    """Read once per process; ``cache_clear()`` re-reads the environment (tests). ConfigurationError
    (one readable line) when a variable is not valid."""
    return read_settings(OrchestratorSettings)
