"""The [llm] table of a profile: target LM, early-exit draft, KL tuning and speculative sampling."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class LLMConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    target: str | None = None
    exit_layer: int = Field(0, ge=0)
    temperature: float = Field(1.0, gt=0.0)


