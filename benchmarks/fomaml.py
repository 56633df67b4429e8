"""First-order MAML of the last blocks of a frozen base: the meta-learned fine-tuning baseline of
the few-shot benchmark (benchmarks/fewshot.py, method ``fomaml``).

Which blocks, and why not the full base: the base is split into a frozen *prefix* and a trainable
*tail* whose composition is exactly the backbone. For EfficientNet-Lite0 the tail is the last
MBConv stage (``blocks[6]``: one 192->320 inverted-residual block, 0.61 M parameters) plus the
1x1 ``conv_head`` (320->1280) and its BatchNorm (0.41 M): the layers that form the pooled features,
1.02 M of the base's 3.37 M parameters (30 %). Everything before runs once per episode without
gradients, so an inner step costs a tail forward/backward on 2x2 (64 px) or 3x3 (96 px) maps
instead of a whole-network pass. Full-base first-order MAML is too slow for this CPU: its inner
step is a whole Lite0 backward, like KM's; ``fewshot.py --plan`` times its 10-step adaptation next
to the tail's (benchmarks/results/fewshot_plan.md), and both the 2000-episode meta-training and
the 600-episode x 4-cell test grid multiply that cost.
For the tiny ``demo`` base (smoke tests) the tail is its last two blocks.

What is meta-learned (first-order MAML, Finn et al. 2017, first-order variant): the tail's
parameters (conv weights and BatchNorm affine terms; BatchNorm keeps the base's running statistics,
as every other method in the benchmark does). The head follows the same policy as every method:
each episode starts it at the support set's class means (Proto-MAML head) and adapts it with the
tail. An episode: copy the meta-parameters into the tail, take ``inner_steps`` Adam steps on the
support set, then take the query loss's gradient at the adapted tail and apply it to the
meta-parameters with an outer Adam step (learning rate annealed linearly to zero, like Reptile's).
"""

from __future__ import annotations

import copy
import time

import numpy as np
import torch
from torch import nn

from km_edge.meta import check_episode_source, group_by_class, prototype_weights, sample_episode

OUTER_LR = 1e-4  # outer Adam learning rate on the tail's meta-parameters (annealed to zero)


def split_tail(backbone: nn.Module) -> tuple[nn.Module, nn.Module, str]:
    """(prefix, tail, description) with ``tail(prefix(x)) == backbone(x)``; shares the modules."""
    features = backbone.features
    if hasattr(features, "blocks") and hasattr(features, "conv_head"):  # timm EfficientNet(-Lite)
        prefix = nn.Sequential(features.conv_stem, features.bn1, *features.blocks[:-1])
        tail = nn.Sequential(features.blocks[-1], features.conv_head, features.bn2,
                             nn.AdaptiveAvgPool2d(1), nn.Flatten())
        return prefix, tail, f"blocks[{len(features.blocks) - 1}] + conv_head + bn2"
    if isinstance(features, nn.Sequential) and len(features) > 2:  # the demo net
        return (nn.Sequential(*features[:-2]),
                nn.Sequential(*features[-2:], nn.AdaptiveAvgPool2d(1), nn.Flatten()),
                f"features[{len(features) - 2}:]")
    raise SystemExit(f"fomaml: no tail split known for {type(features).__name__}")


class TailLearner:
    """A copy of a base split into a frozen prefix and a trainable tail, plus a per-episode head."""

    def __init__(self, backbone: nn.Module, feature_size: int, ways: int):
        self.backbone = copy.deepcopy(backbone).eval()
        for param in self.backbone.parameters():
            param.requires_grad_(False)
        self.prefix, self.tail, self.description = split_tail(self.backbone)
        for param in self.tail.parameters():
            param.requires_grad_(True)
        self.head = nn.Linear(feature_size, ways)
        with torch.no_grad():  # the split must compute exactly the backbone
            probe = torch.randn(2, 3, 32, 32)
            if not torch.allclose(self.tail(self.prefix(probe)), self.backbone(probe), atol=1e-5, rtol=1e-4):
                raise SystemExit("fomaml: the prefix/tail split does not reproduce the backbone")

    def tail_params(self) -> list[nn.Parameter]:
        return list(self.tail.parameters())

    def get(self) -> list[torch.Tensor]:
        return [p.detach().clone() for p in self.tail_params()]

    def put(self, values: list[torch.Tensor]) -> None:
        with torch.no_grad():
            for param, value in zip(self.tail_params(), values):
                param.copy_(value)

    def n_params(self) -> int:
        return sum(p.numel() for p in self.tail_params())

    @torch.no_grad()
    def prefix_features(self, images: torch.Tensor) -> torch.Tensor:
        return self.prefix(images)

    def adapt(self, support_maps: torch.Tensor, labels: torch.Tensor, ways: int, steps: int, lr: float,
              head_lr: float) -> None:
        """Prototype head on the tail's features, then ``steps`` full-batch Adam steps on tail + head."""
        self.tail.eval()  # BatchNorm keeps the base's statistics
        if self.head.out_features != ways:
            self.head = nn.Linear(self.head.in_features, ways)
        with torch.no_grad():
            weight, bias = prototype_weights(self.tail(support_maps), labels, ways)
            self.head.weight.copy_(weight)
            self.head.bias.copy_(bias)
        optimizer = torch.optim.Adam([{"params": self.tail_params(), "lr": lr},
                                      {"params": list(self.head.parameters()), "lr": head_lr}])
        for _ in range(steps):
            loss = nn.functional.cross_entropy(self.head(self.tail(support_maps)), labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

    @torch.no_grad()
    def accuracy(self, query_maps: torch.Tensor, labels: torch.Tensor) -> float:
        return float((self.head(self.tail(query_maps)).argmax(1) == labels).float().mean())


def fomaml(learner: TailLearner, images: torch.Tensor, labels: list[int], *, ways: int, shots: int, queries: int,
           episodes: int, inner_steps: int, lr: float, head_lr: float, outer_lr: float = OUTER_LR, seed: int = 0,
           progress: bool = True) -> dict:
    """First-order MAML on ``learner``'s tail (left at the meta-parameters); returns the record."""
    from tqdm.auto import tqdm

    groups = group_by_class(labels)
    classes = check_episode_source(groups, ways, shots, queries, "fomaml source")
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    theta = [p.detach().clone().requires_grad_(True) for p in learner.tail_params()]
    outer = torch.optim.Adam(theta, lr=outer_lr)
    history, window, started = [], [], time.perf_counter()
    bar = tqdm(total=episodes, desc="fomaml", disable=not progress, leave=False, dynamic_ncols=True)
    for index in range(episodes):
        episode = sample_episode(groups, classes, ways, shots, queries, rng)
        s_idx, s_lab = zip(*episode.support)
        q_idx, q_lab = zip(*episode.query)
        support = learner.prefix_features(images[list(s_idx)])
        query = learner.prefix_features(images[list(q_idx)])
        support_y, query_y = torch.tensor(s_lab), torch.tensor(q_lab)
        learner.put(theta)
        learner.adapt(support, support_y, ways, inner_steps, lr, head_lr)
        learner.tail.zero_grad(set_to_none=True)
        query_logits = learner.head(learner.tail(query))
        nn.functional.cross_entropy(query_logits, query_y).backward()
        window = (window + [float((query_logits.argmax(1) == query_y).float().mean())])[-50:]
        for value, param in zip(theta, learner.tail_params()):
            value.grad = param.grad.detach().clone()  # first order: the adapted point's gradient
        for group in outer.param_groups:
            group["lr"] = outer_lr * (1.0 - index / episodes)
        outer.step()
        if index % max(1, episodes // 20) == 0 or index == episodes - 1:
            history.append({"episode": index + 1, "query_accuracy_last50": float(np.mean(window))})
        bar.update(1)
        bar.set_postfix(query_acc=f"{np.mean(window):.3f}")
    bar.close()
    learner.put([t.detach() for t in theta])
    seconds = time.perf_counter() - started
    return {"algorithm": "first-order MAML", "tail": learner.description, "tail_params": learner.n_params(),
            "episodes": episodes, "seconds": round(seconds, 3),
            "seconds_per_episode": round(seconds / max(1, episodes), 4), "source_classes": len(classes),
            "outer_lr": outer_lr, "history": history}
