"""The operations one eager token dispatches, counted on the meta device at the 14B shape (a
figure, not a timing): split by part, each part growing as the model's structure says."""

from nextstep.engine.opcount import count_token_ops
from nextstep.tools.shapes import random_config


def test_the_14b_token_is_counted_by_part_on_the_meta_device():
    config, _, _ = random_config("nextstep-1-large")
    one, two, fifty = (count_token_ops(config, "v1", steps, branches=2) for steps in (1, 2, 50))
    assert fifty.total == fifty.backbone + fifty.head + fifty.sampler
    assert one.backbone == two.backbone == fifty.backbone, "the backbone runs once a token, whatever the steps"
    per_step = two.total - one.total
    assert fifty.total == one.total + 49 * per_step, "every sampling step runs the same operations"
    # The flow head's path per evaluation: 12 residual blocks of 6 operations, its input and final
    # layers; guidance and the v1 update take the rest.
    assert two.head - one.head == 12 * 6 + 4
    assert per_step <= 86, f"{per_step} operations a sampling step"
    print(f"nextstep-1-large, v1, 50 steps, cfg: {fifty.to_dict()}")


def test_the_backbone_counts_the_same_operations_in_every_layer():
    config, _, _ = random_config("tiny")
    two_layers = count_token_ops(config, "v1", 2)
    config.num_hidden_layers = 4
    four_layers = count_token_ops(config, "v1", 2)
    per_layer = (four_layers.backbone - two_layers.backbone) // 2
    assert four_layers.backbone == two_layers.backbone + 2 * per_layer and per_layer == 36
    assert four_layers.head == two_layers.head and four_layers.sampler == two_layers.sampler
