"""Deployment targets of a TensorRT engine: the shapes it must accept, its builder settings, and which plugin build
it needs. Nothing here imports TensorRT, so the commands can check a target before any work."""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import UserError

MiB = 1 << 20

# --hardware-compat value -> TensorRT's HardwareCompatibilityLevel member.
HARDWARE_COMPAT = {"none": "NONE", "same-compute-capability": "SAME_COMPUTE_CAPABILITY",
                   "ampere-plus": "AMPERE_PLUS"}


@dataclass(frozen=True)
class Target:
    name: str
    device: str
    sm: str | None  # compute capability the engine is for (None: whatever GPU builds it)
    max_batch: int
    max_context: int  # past + new tokens of one sequence (and the most new tokens of one prefill call)
    decode_opt: tuple[int, int]  # (batch, past) TensorRT tunes the decode profile for
    prefill_opt: tuple[int, int]  # (batch, new tokens) TensorRT tunes the prefill profile for
    workspace_bytes: int | None  # builder workspace pool limit (None: TensorRT's default, the device memory)
    optimization_level: int  # builder optimisation level, 0..5 (TensorRT's default is 3)
    hardware_compat: tuple[str, ...]  # levels allowed for this target; the first is the default
    plugin_variant: str  # tools/build_plugins.sh --variant that makes the plugin for it
    plugin_cuda_major: int | None  # CUDA major version the plugin must be built with (None: any)

    def hardware_level(self, requested: str | None) -> str:
        level = requested or self.hardware_compat[0]
        if level not in self.hardware_compat:
            raise UserError(f"--hardware-compat {level} is not available for --target {self.name} "
                            f"(choose from {', '.join(self.hardware_compat)})")
        return level

    def describe(self) -> dict:
        return {"name": self.name, "device": self.device, "sm": self.sm, "max_batch": self.max_batch,
                "max_context": self.max_context}


TARGETS = {
    # Jetson Orin (AGX, NX, Nano: all sm_87) under JetPack 6: CUDA 12, memory shared with the CPU, so one sequence
    # and a small workspace. The engine is built on the Orin itself; every Orin module is sm_87, which is what
    # same-compute-capability buys there.
    "edge": Target("edge", "Jetson Orin (JetPack 6, CUDA 12)", "87", max_batch=1, max_context=2048,
                   decode_opt=(1, 1024), prefill_opt=(1, 512), workspace_bytes=256 * MiB, optimization_level=3,
                   hardware_compat=("none", "same-compute-capability"), plugin_variant="edge",
                   plugin_cuda_major=12),
    # L40 / L40S (Ada, sm_89, 48 GB): batched serving.
    "l40": Target("l40", "NVIDIA L40 (Ada)", "89", max_batch=16, max_context=4096, decode_opt=(8, 2048),
                  prefill_opt=(1, 1024), workspace_bytes=4096 * MiB, optimization_level=3,
                  hardware_compat=("none", "same-compute-capability", "ampere-plus"), plugin_variant="default",
                  plugin_cuda_major=None),
    # The GPU of the machine that builds: what `model --trt` built before targets existed.
    "native": Target("native", "the GPU of the building machine", None, max_batch=1, max_context=2048,
                     decode_opt=(1, 1024), prefill_opt=(1, 1024), workspace_bytes=None, optimization_level=3,
                     hardware_compat=("none",), plugin_variant="default", plugin_cuda_major=None),
}


def get_target(name: str) -> Target:
    if name not in TARGETS:
        raise UserError(f"unknown target {name!r} (choose from {', '.join(TARGETS)})")
    return TARGETS[name]


def input_shape(name: str, dims: list, batch: int, seq: int, past: int) -> tuple[int, ...]:
    """Concrete shape of one model input for a given batch, new-token count and past length (Optimum names)."""
    if name in ("input_ids", "position_ids"):
        return (batch, seq)
    if name == "attention_mask":
        return (batch, past + seq)
    if name.startswith("past_key_values."):
        return (batch, int(dims[1]), past, int(dims[3]))
    raise UserError(f"unexpected engine input {name!r} (the engine takes input_ids, attention_mask, position_ids "
                    "and past_key_values.*)")


def profile_plans(target: Target, has_cache: bool) -> dict[str, list[tuple[int, int, int]]]:
    """(batch, new tokens, past) at min, opt and max of each optimisation profile. With a KV cache: decode (one
    new token after any past) and prefill (many new tokens, no past). Without one, every call is a prefill."""
    c, b = target.max_context, target.max_batch
    prefill = [(1, 1, 0), (min(target.prefill_opt[0], b), min(target.prefill_opt[1], c), 0), (b, c, 0)]
    if not has_cache:
        return {"prefill": prefill}
    decode = [(1, 1, 0), (min(target.decode_opt[0], b), 1, min(target.decode_opt[1], c - 1)), (b, 1, c - 1)]
    return {"decode": decode, "prefill": prefill}


def profile_shapes(target: Target, inputs: dict[str, list]) -> dict[str, dict[str, list[list[int]]]]:
    """{profile: {input: [min shape, opt shape, max shape]}} for the network's inputs."""
    has_cache = any(name.startswith("past_key_values.") for name in inputs)
    return {profile: {name: [list(input_shape(name, dims, *stage)) for stage in stages]
                      for name, dims in inputs.items()}
            for profile, stages in profile_plans(target, has_cache).items()}
