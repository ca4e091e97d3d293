"""What a front end needs to know of a serving version to parse, validate and answer requests:
a small frozen value that crosses process boundaries, with no runtime session behind it."""

from __future__ import annotations

from dataclasses import dataclass

from edged.runtime.base import TensorSpec, backend_for
from edged.serve.slot import ServedVersion


@dataclass(frozen=True)
class ModelView:
    model_name: str
    version: str
    platform: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    dynamic_batch: bool
    max_batch_size: int
    max_queue_delay_us: int
    priority_levels: int
    default_priority: int

    @classmethod
    def of(cls, served: ServedVersion) -> ModelView:
        """Probes the version's model file for its platform: call off the event loop."""
        batching = served.config.batching
        return cls(
            model_name=served.model_name,
            version=served.version,
            platform=backend_for(served.version_dir).platform,
            inputs=served.model.inputs,
            outputs=served.model.outputs,
            dynamic_batch=served.model.dynamic_batch,
            max_batch_size=batching.max_batch_size,
            max_queue_delay_us=batching.max_queue_delay_us,
            priority_levels=batching.priority_levels,
            default_priority=batching.default_priority,
        )

    def metadata(self) -> dict[str, object]:
        """The Open Inference Protocol's model metadata."""
        return {
            "name": self.model_name,
            "versions": [self.version],
            "platform": self.platform,
            "inputs": [t.as_dict() for t in self.inputs],
            "outputs": [t.as_dict() for t in self.outputs],
        }

    def config(self) -> dict[str, object]:
        """Triton's model configuration, as its clients read it."""
        dynamic = self.dynamic_batch

        def dims(spec: TensorSpec) -> list[int]:
            return list(spec.shape[1:] if dynamic else spec.shape)

        return {
            "name": self.model_name,
            "max_batch_size": self.max_batch_size if dynamic else 0,
            "dynamic_batching": {"max_queue_delay_microseconds": self.max_queue_delay_us}
            if dynamic
            else None,
            "input": [
                {"name": t.name, "data_type": f"TYPE_{t.datatype}", "dims": dims(t)}
                for t in self.inputs
            ],
            "output": [
                {"name": t.name, "data_type": f"TYPE_{t.datatype}", "dims": dims(t)}
                for t in self.outputs
            ],
        }
