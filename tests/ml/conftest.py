"""Fixtures of the model tests: one small demo dataset per run, tiny model configs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ml.coco import CocoSplit, read_demo
from ml.demo import write_demo_dataset
from ml.segmenter import SegmenterConfig
from ml.tagger import TaggerConfig

torch.set_num_threads(1)  # the CI machine has 2 shared cores; 2 threads thrash under load


@pytest.fixture(scope="session")
def demo_split(tmp_path_factory: pytest.TempPathFactory) -> CocoSplit:
    folder: Path = tmp_path_factory.mktemp("demo") / "demo"
    write_demo_dataset(folder, seed=7, n_images=40)
    return read_demo(folder)


def tiny_tagger_config(
    tags: tuple[str, ...], parents: tuple[int, ...] = (), size: int = 64
) -> TaggerConfig:
    return TaggerConfig(tags, parents, backbone="mobilenetv3_small_050", input_size=size)


def tiny_segmenter_config(tags: tuple[str, ...], size: int = 64) -> SegmenterConfig:
    return SegmenterConfig(
        tags, encoder="tu-resnet10t", encoder_depth=3, decoder_channels=(32, 16, 8), input_size=size
    )
