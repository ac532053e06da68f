"""The model specs of a job config, one pydantic model per ``kind``; torch-free, so the driver checks them
before anything is loaded or started.

A spec model states which keys a kind takes and their types; the kind's builder (``models.registry``) still
owns what only loading can tell (that a factory imports, that weights fit). Specs are validated in strict
mode: what YAML gives as a string is not silently turned into a number.
"""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field

DIFFUSERS_FOLDER_HELP = (
    "a diffusers denoiser folder is a DDPMPipeline folder (model_index.json, unet/ with config.json + "
    "diffusion_pytorch_model.safetensors of a UNet2DModel, scheduler/ with scheduler_config.json), or pass "
    "unet= (a UNet2DModel folder) and scheduler= (a folder with scheduler_config.json) separately"
)

#: spec keys that hold a file or folder (resolved against the config's folder when relative)
PATH_KEYS, PATH_SUFFIXES = ("path", "weights", "checkpoint", "unet", "scheduler"), ("_path", "_file", "_dir")
PositiveInt = Annotated[int, Field(ge=1)]
NonNegativeInt = Annotated[int, Field(ge=0)]
RGB = Annotated[list[float], Field(min_length=3, max_length=3)]


class Spec(BaseModel):
    """A model spec: unknown keys are errors, values keep the type YAML gave them."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)
    #: what the kind's files must be, for the driver's message when one does not exist
    files_help: ClassVar[str] = ""
    kind: str
    name: str = ""


# ------------------------------------------------------------------------------------------------- segmenters
class SegmenterSpec(Spec):
    """Keys every segmenter kind takes: normalisation, checkpoint selection, SegCertify's input scale."""

    mean: RGB | None = None
    std: RGB | None = None
    state_dict_key: str | None = None
    strip_prefix: str = ""
    input_scale: Annotated[float, Field(gt=0)] | None = None
    input_size: Annotated[list[PositiveInt], Field(min_length=2, max_length=2)] | None = None


class ModuleSegmenterSpec(SegmenterSpec):
    """``factory(**kwargs)`` from an importable ``package.module:callable``, optionally with ``weights``."""

    kind: Literal["module"]
    factory: str
    kwargs: dict[str, Any] = Field(default_factory=dict)
    weights: str | None = None
    num_classes: PositiveInt | None = None  # its builder asks for it when missing


class TorchscriptSegmenterSpec(SegmenterSpec):
    kind: Literal["torchscript"]
    path: str
    num_classes: PositiveInt | None = None  # its builder asks for it when missing


class TorchvisionSegmenterSpec(SegmenterSpec):
    kind: Literal["torchvision"]
    arch: str
    num_classes: PositiveInt | None = None  # its builder asks for it when missing
    weights: str


class TransformersSegmenterSpec(SegmenterSpec):
    """A transformers ``save_pretrained`` folder: a semantic or a universal segmentation model."""

    files_help: ClassVar[str] = (
        "path is a transformers save_pretrained folder (config.json, model.safetensors)"
    )
    kind: Literal["transformers"]
    path: str


class SegformerSegmenterSpec(TransformersSegmenterSpec):
    """``segformer``: the name this kind had when it loaded SegFormer only."""

    kind: Literal["segformer"]


# -------------------------------------------------------------------------------------------------- denoisers
Resolution = Literal["native", "tile", "resize"]
Variance = Literal["auto", "learned", "fixed"]


class IdentityDenoiserSpec(Spec):
    """No denoising (the SegCertify baseline)."""

    kind: Literal["identity"]


class DiffusionOptions(Spec):
    """Where the UNet runs and how many reverse steps (``DiffusionDenoiser``'s options)."""

    resolution: Resolution = "native"
    tile_overlap: NonNegativeInt = 16
    multistep: NonNegativeInt = 0
    multistep_seed: int = 0
    variance: Variance = "auto"


class DiffusersDenoiserSpec(DiffusionOptions):
    """A diffusers ``UNet2DModel`` + DDPM scheduler: a pipeline folder ``path``, or ``unet`` and ``scheduler``."""

    files_help: ClassVar[str] = DIFFUSERS_FOLDER_HELP
    kind: Literal["diffusers"]
    path: str | None = None
    unet: str | None = None
    scheduler: str | None = None
    multiple_of: PositiveInt = 8
    sample_size: PositiveInt | None = None
    prediction_type: Literal["epsilon", "v_prediction", "sample"] | None = None


class ADMDenoiserSpec(DiffusionOptions):
    """A guided-diffusion checkpoint and its architecture: ``preset``, ``flags`` and/or ``flags_file``."""

    files_help: ClassVar[str] = (
        "checkpoint is guided-diffusion's .pt file (e.g. 256x256_diffusion_uncond.pt), downloaded beforehand"
    )
    kind: Literal["adm"]
    checkpoint: str
    preset: str | None = None
    flags: dict[str, Any] | None = None
    flags_file: str | None = None
    noise_schedule: Literal["linear", "cosine"] | None = None
    diffusion_steps: PositiveInt | None = None


def is_path_key(key: str) -> bool:
    """A model-spec key that holds a file or folder (resolved against the config's folder when relative)."""
    return key in PATH_KEYS or str(key).endswith(PATH_SUFFIXES)
