"""Every setting of the product, read once from the environment (and `.env`).

One typed object instead of `os.environ` lookups scattered over modules: a typo in a
variable name fails at start-up with a clear message, and `.env.example` can be checked
against this file.
"""

from __future__ import annotations

from functools import cached_property, lru_cache
from typing import Annotated, Literal

from pydantic import Field, HttpUrl, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict


class Settings(BaseSettings):
    """Configuration shared by the webhook and the worker."""

    model_config = SettingsConfigDict(env_file=".env", extra="ignore", frozen=True)

    # --- Redis and the queue -------------------------------------------------------------
    redis_url: str = "redis://127.0.0.1:6379/0"
    broker_url: str | None = Field(default=None, description="Defaults to REDIS_URL.")
    # Plain characters only: the prefix also goes into SCAN patterns and hash tags.
    key_prefix: str = Field(default="wa", pattern=r"^[A-Za-z0-9_.\-]+$", max_length=64)
    task_queue: str = "replies"
    redis_socket_timeout: float = Field(default=1.0, gt=0)

    # --- Conversations -------------------------------------------------------------------
    session_expire_time: int = Field(default=3600, gt=0)
    max_history_messages: int = Field(default=50, gt=0)
    dedupe_ttl_seconds: int = Field(default=86400, gt=0)
    max_text_length: int = Field(default=4096, gt=0)
    max_body_bytes: int = Field(default=65536, gt=0)
    max_pending_per_session: int = Field(default=50, gt=0)
    rate_limit_per_minute: int = Field(default=20, ge=0, description="0 disables it.")

    # --- Worker --------------------------------------------------------------------------
    lock_timeout_seconds: int = Field(
        default=30, ge=2, description="Expiry of a session lock; its holder renews it."
    )
    recovery_interval_seconds: int = Field(default=15, gt=0)
    recovery_grace_seconds: int = Field(default=30, ge=0)
    debounce_seconds: float = Field(default=0, ge=0)
    debounce_max_wait_seconds: float = Field(default=10, ge=0)
    task_soft_time_limit: int = Field(default=90, gt=0)
    task_time_limit: int = Field(default=110, gt=0)
    worker_heartbeat_seconds: int = Field(default=10, gt=0)
    worker_start_timeout_seconds: int = Field(
        default=300, gt=0, description="How long a new worker process may take to load the model."
    )
    task_max_retries: int = Field(default=3, ge=0)
    worker_metrics_port: int = Field(default=9100, ge=0, le=65535, description="0: off.")
    worker_task_events: bool = Field(
        default=False, description="Always send task events; off: once a monitor asks."
    )
    generation_batch_size: int = Field(
        default=8, ge=1, le=256, description="Most replies one generate call makes; 1: off."
    )
    generation_batch_wait_ms: float = Field(
        default=5,
        ge=0,
        le=1000,
        description=(
            "How long an idle batcher waits for another reply to join a batch; "
            "each one that joins restarts the wait."
        ),
    )
    torch_threads: int = Field(
        default=0, ge=0, description="0: one per core, shared among prefork processes."
    )

    # --- Model ---------------------------------------------------------------------------
    model_name: str = "microsoft/DialoGPT-medium"
    device: str = "auto"
    model_dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        default="auto", description="auto: float16 on CUDA, float32 on CPU."
    )
    model_quantization: Literal["none", "int8"] = Field(
        default="none",
        description="int8: dynamic int8 quantisation of the linear layers (CPU only).",
    )
    model_packed_linear: bool = Field(
        default=False,
        description="float32 on CPU: linear weights laid out once for oneDNN (faster, more RAM).",
    )
    max_new_tokens: int = Field(default=64, gt=0)
    min_new_tokens: int = Field(default=0, ge=0)
    do_sample: bool = True
    # Lower is greedy decoding in all but name, and transformers' own sampling (TOP_K=0)
    # overflows float32 scores near 1e-37: for greedy replies set DO_SAMPLE=false.
    temperature: float = Field(default=0.7, ge=0.01)
    top_k: int = Field(default=50, ge=0)
    top_p: float = Field(default=0.92, gt=0, le=1)
    repetition_penalty: float = Field(default=1.1, gt=0)
    no_repeat_ngram_size: int = Field(default=3, ge=0)
    system_prompt: str = ""
    fallback_reply: str = "Sorry, I did not understand that. Could you say it another way?"
    max_reply_chars: int = Field(default=4096, ge=16, description="WhatsApp's text limit.")

    # --- WhatsApp and conversation commands ----------------------------------------------
    whatsapp_verify_token: SecretStr | None = None
    non_text_messages: Literal["reply", "ignore"] = "reply"
    non_text_reply: str = "Sorry, I can only read text messages for now."
    reset_commands: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: ["/reset", "reiniciar"]
    )
    reset_reply: str = "Done, I have forgotten our conversation. How can I help?"

    # --- Callback to n8n -----------------------------------------------------------------
    n8n_callback_url: HttpUrl | None = None
    callback_timeout_seconds: float = Field(default=10.0, gt=0)
    callback_max_retries: int = Field(default=3, ge=0)
    callback_retry_backoff_seconds: int = Field(default=2, ge=1)
    callback_max_backoff_seconds: int = Field(default=120, ge=1)
    callback_max_age_seconds: int = Field(default=3600, ge=1)
    callback_allowed_hosts: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Comma-separated hosts or origins a payload's callback_url may use; "
        "empty means only the origin of N8N_CALLBACK_URL.",
    )

    # --- Security ------------------------------------------------------------------------
    environment: Literal["development", "production"] = "development"
    webhook_token: SecretStr | None = None
    whatsapp_app_secret: SecretStr | None = None
    admin_token: SecretStr | None = None
    callback_secret: SecretStr | None = None

    # --- Process -------------------------------------------------------------------------
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    log_format: Literal["auto", "json", "text"] = Field(
        default="auto", description="auto: json in production, text in development."
    )

    @field_validator(
        "n8n_callback_url",
        "webhook_token",
        "whatsapp_app_secret",
        "admin_token",
        "callback_secret",
        "whatsapp_verify_token",
        mode="before",
    )
    @classmethod
    def _blank_is_unset(cls, value: object) -> object:
        """`.env` files often carry `NAME=` meaning "not set"."""
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator("callback_allowed_hosts", "reset_commands", mode="before")
    @classmethod
    def _split_hosts(cls, value: object) -> object:
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    @cached_property
    def reset_words(self) -> frozenset[str]:
        """RESET_COMMANDS as a message is compared with them, worked out once, not per message."""
        return frozenset(c.strip().casefold() for c in self.reset_commands if c.strip())

    @model_validator(mode="after")
    def _cpu_weight_options_fit(self) -> Settings:
        """int8 and packed linear layers rework float32 weights on the CPU; nothing else runs."""
        options = []
        if self.model_quantization == "int8":
            options.append("MODEL_QUANTIZATION=int8")
        if self.model_packed_linear:
            options.append("MODEL_PACKED_LINEAR=true")
        if len(options) > 1:
            raise ValueError(
                "MODEL_PACKED_LINEAR=true lays out float32 weights that MODEL_QUANTIZATION=int8 "
                "replaces: choose one"
            )
        for option in options:
            if self.model_dtype not in ("auto", "float32"):
                raise ValueError(
                    f"{option} works on float32 weights; MODEL_DTYPE={self.model_dtype} "
                    "cannot be combined with it (use auto or float32)"
                )
            if self.device.startswith("cuda"):
                raise ValueError(
                    f"{option} runs on the CPU only; with DEVICE={self.device} leave it out "
                    "(CUDA uses float16 by itself)"
                )
        return self

    @property
    def is_production(self) -> bool:
        return self.environment == "production"

    @property
    def effective_log_format(self) -> Literal["json", "text"]:
        if self.log_format == "auto":
            return "json" if self.is_production else "text"
        return self.log_format

    @property
    def effective_broker_url(self) -> str:
        return self.broker_url or self.redis_url


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings; tests call `get_settings.cache_clear()` after changing env."""
    return Settings()
