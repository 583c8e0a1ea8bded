"""Cheap generators for engine tests; module-level so the process (spawn) backend can import them."""

import time

import torch


class BlendGenerator:
    """Cheap stand-in diffusion: moves a source towards a per-class template by r (deterministic)."""

    def __init__(self, num_classes=4, shape=(1, 8, 8), delay=0.0, fail_every=0, nan=False):
        self.num_classes = num_classes
        g = torch.Generator().manual_seed(0)
        self.templates = torch.rand(num_classes, *shape, generator=g)
        self.delay, self.fail_every, self.nan = delay, fail_every, nan
        self.calls = 0

    def generate(self, sources, source_labels, target_labels, ratios, seed=None):
        self.calls += 1
        if self.delay:
            time.sleep(self.delay)
        if self.fail_every and self.calls % self.fail_every == 0:
            raise RuntimeError(f"deliberate failure on call {self.calls}")
        r = torch.as_tensor(ratios, dtype=torch.float32).view(-1, 1, 1, 1)
        out = (1 - r) * sources + r * self.templates[target_labels]
        if self.nan:
            out[0] = float("nan")
        return out


def make_slow_blend_generator() -> BlendGenerator:
    """A picklable factory: a blend generator that takes 0.3 s per call."""
    return BlendGenerator(delay=0.3)


MARKER_CODES = (0.2, 0.4, 0.6, 0.8)


class MarkerGenerator:
    """Marks each output so a fake teacher can read its posterior: pixel (0, 0, 0) holds a code from
    ``codes`` (row i gets ``codes[i % len(codes)]``), pixel (0, 0, 1) the target class / 10."""

    num_classes = 10

    def __init__(self, codes=MARKER_CODES):
        self.codes = tuple(float(c) for c in codes)

    def generate(self, sources, source_labels, target_labels, ratios, seed=None):
        out = sources.clone().float()
        n = out.shape[0]
        out[:, 0, 0, 0] = torch.tensor([self.codes[i % len(self.codes)] for i in range(n)])
        out[:, 0, 0, 1] = torch.as_tensor(target_labels).float() / 10
        return out


class MarkerTeacher(torch.nn.Module):
    """Fake teacher over ``k`` classes: logit z on the target class read from pixel (0, 0, 1), 0 elsewhere,
    so ``P(target | {source, target}) = sigmoid(z) = p``; p is the image's marker code, or ``fixed_p``."""

    def __init__(self, k=4, fixed_p=None):
        super().__init__()
        self.k, self.fixed_p = k, fixed_p
        self.scale = torch.nn.Parameter(torch.ones(()))  # a parameter, so it has a device
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        p = x[:, 0, 0, 0].double() if self.fixed_p is None else torch.full((x.shape[0],), float(self.fixed_p),
                                                                         dtype=torch.float64)
        z = torch.log(p / (1 - p)).float() * self.scale
        target = torch.round(x[:, 0, 0, 1].double() * 10).long().clamp(0, self.k - 1)
        logits = torch.zeros(x.shape[0], self.k)
        logits[torch.arange(x.shape[0]), target] = z
        return logits


def make_result(images, pair, ratio, request_id=0):
    """A finished generation result holding ``images`` for ``pair`` at noise ratio ``ratio``."""
    from hardneg.worker import GenerationRequest, GenerationResult

    n = images.shape[0]
    req = GenerationRequest(request_id=request_id, pair=pair, source_ids=torch.arange(n), sources=None,
                            source_labels=torch.full((n,), pair[0]), target_labels=torch.full((n,), pair[1]),
                            ratios=torch.full((n,), float(ratio)))
    return GenerationResult(req, images.detach().clone().float())


def spy_observe(engine):
    """Record the labels every ``engine.observe`` call receives (the list is returned)."""
    seen = []
    inner = engine.observe

    def observe(*args, **kwargs):
        labels = kwargs.get("labels", args[1] if len(args) > 1 else None)
        seen.append(torch.as_tensor(labels).detach().clone())
        return inner(*args, **kwargs)

    engine.observe = observe
    return seen


class OnDeviceGenerator(BlendGenerator):
    """A blend generator that says it lives on another device than the worker's (no real GPU needed)."""

    device = "cuda:1"
