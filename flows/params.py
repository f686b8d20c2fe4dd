"""The one validated parameter model of the `mamfusion` flows (what the Prefect UI renders as a form).

A production run names its data: `videos` + `annotations`, or an `mssl` bundle; nothing is assumed. The
demo is an explicit choice, `demo: true` (the `mamfusion/demo` deployment): the bundled demo corpus under
`demo_out/`, generated first when missing. Relative paths are read from the working directory, which the
deployments set to the repository root.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from models.config import ConfigError, ExperimentConfig, load_preset
from storage.annotations import FORMATS
from tasks.profiles import PROFILE_NAMES

DEMO_ROOT = "demo_out"
DEFAULT_VIDEOS = f"{DEMO_ROOT}/corpus/videos"
DEFAULT_ANNOTATIONS = f"{DEMO_ROOT}/corpus/annotations.csv"
DEFAULT_STORE = f"{DEMO_ROOT}/features.zarr"
DEFAULT_OUTPUT = f"{DEMO_ROOT}/pipeline"


class MsslSource(BaseModel):
    """The MS-SL benchmark bundle instead of a video folder (features are imported, not extracted)."""

    model_config = ConfigDict(extra="forbid")

    root: str = Field(description="bundle root holding <collection>/FeatureData and TextData")
    collection: Literal["tvr", "activitynet", "charades"]
    feature: str = Field(description="FeatureData folder, e.g. i3d_resnet")
    seconds_per_row: float = Field(1.0, gt=0, description="seconds each feature row spans")


class PipelineParams(BaseModel):
    """Where the data is, how to featurise and train it, and where results go."""

    model_config = ConfigDict(extra="forbid")

    demo: bool = Field(False, description="use the bundled demo corpus (generated when missing)")
    videos: str | None = Field(None, description="folder of videos (scanned recursively)")
    mssl: MsslSource | None = Field(None, description="MS-SL bundle to train on instead of `videos`")
    annotations: str | None = Field(
        None, description="captions with train/val[/test] splits (ignored with `mssl`)"
    )
    annotation_format: Literal[FORMATS] | None = Field(None, description="detected when empty")  # type: ignore[valid-type]
    val_annotations: str | None = Field(
        None, description="validation captions if `annotations` has no val split"
    )
    profile: Literal[PROFILE_NAMES] = Field("lite", description="feature profile")  # type: ignore[valid-type]
    device: Literal["auto", "cpu", "cuda"] = "auto"
    preset: str = Field("demo", description="training recipe: tvr, activitynet, charades, demo")
    overrides: dict[str, Any] = Field(default_factory=dict, description="config overrides, e.g. {n_epoch: 3}")
    store: str = Field(DEFAULT_STORE, description="feature store: a path or an fsspec URL (s3://...)")
    output: str = Field(DEFAULT_OUTPUT, description="catalog, training runs, published models, results cache")
    extract_concurrency: int = Field(2, ge=1, description="videos extracted at the same time")
    build_index: bool = Field(True, description="index the gallery with the current model for search")

    @model_validator(mode="after")
    def _check(self) -> PipelineParams:
        if self.demo:
            if self.mssl is not None:
                raise ValueError("`demo` uses the demo corpus; leave `mssl` empty")
            self.videos = self.videos or DEFAULT_VIDEOS
            self.annotations = self.annotations or DEFAULT_ANNOTATIONS
        if (self.videos is None) == (self.mssl is None):
            raise ValueError(
                "give exactly one source: `videos` (a folder, with `annotations`) or `mssl` (a bundle); "
                "for the bundled demo corpus set `demo: true`"
            )
        if self.videos is not None and self.annotations is None:
            raise ValueError("`annotations` is required with a video folder")
        self.experiment()  # fail at submission, not after extraction
        return self

    def experiment(self) -> ExperimentConfig:
        """The training config: preset + overrides, with the device choice applied."""
        extra = {} if self.device == "auto" or "device" in self.overrides else {"train.device": self.device}
        try:
            return load_preset(self.preset, {**self.overrides, **extra})
        except ConfigError as exc:
            raise ValueError(str(exc)) from None

    def resolved(self) -> PipelineParams:
        """Paths made absolute against the working directory, so task inputs mean the same everywhere."""
        paths = ("videos", "annotations", "val_annotations", "output")
        update = {k: str(Path(getattr(self, k)).absolute()) for k in paths if getattr(self, k) is not None}
        if "://" not in self.store:
            update["store"] = str(Path(self.store).absolute())
        return self.model_copy(update=update)
