"""The ClientApp ships its source's density with the prompt, unless ``share-density = false``."""

from __future__ import annotations

import pytest
import torch
from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.supercore.task_identity import TaskIdentity
from synthetic import make_idx_dataset

from client.client_app import train
from common.compose import Weighting, default_weighting
from common.config import AppConfig, build_model
from common.data import backbone_transform, load_client_shard
from common.records import prompt_from_records


@pytest.fixture(scope="module")
def run_config(tmp_path_factory) -> dict:
    data = make_idx_dataset(tmp_path_factory.mktemp("idx"), n_train=120, n_test=40)
    return {"backbone": "vit_tiny_patch16_224", "pretrained": False, "img-size": 32, "data-dir": str(data),
            "examples-per-source": 40, "local-epochs": 1, "min-steps": 2, "batch-size": 16,
            "partitioner": "classes"}


def train_reply(run_config: dict, **overrides) -> Message:
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    context = Context(run_id=1, node_id=1, node_config={"partition-id": 0, "num-partitions": 3}, state=RecordDict(),
                      run_config=run_config | overrides)
    msg = Message(RecordDict({"config": ConfigRecord({"parent-version": 0})}), dst_node_id=1,
                  message_type=MessageType.TRAIN)
    return train(msg, context)


def test_reply_carries_the_density_of_the_training_images(run_config):
    config = AppConfig.from_run_config(run_config)
    model = build_model(config, device="cpu")
    prompt = prompt_from_records(train_reply(run_config).content, model)
    assert prompt.density is not None and default_weighting([prompt]) is Weighting.DENSITY
    shard, _ = load_client_shard(config.dataset, config.data_path(), 0, 3, "classes", seed=0, max_examples=40,
                                 val_fraction=config.val_fraction, transform=backbone_transform(model.backbone))
    images = torch.stack([shard[i][0] for i in range(len(shard))])
    with torch.no_grad():
        pooled = model.pooled(model.backbone_forward(images)[0])
    assert prompt.density.num_images == len(shard) == prompt.config.num_examples
    assert prompt.density.classes.tolist() == list(prompt.config.labels) == shard.label_set()
    first = torch.as_tensor(shard.labels) == int(prompt.density.classes[0])
    torch.testing.assert_close(prompt.density.mean[0].double(), pooled[first].double().mean(0), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("overrides", [{"share-density": False}, {"mode": "fedavg"}])
def test_no_density_leaves_the_client_when_private_or_fedavg(run_config, overrides):
    content = train_reply(run_config, **overrides).content
    assert not any(name.startswith("density.") for name in content["arrays"].keys())
    model = build_model(AppConfig.from_run_config(run_config), device="cpu")
    assert prompt_from_records(content, model).density is None
