"""Every ```python block in README.md and docs/*.md runs, so a documented snippet cannot rot.

Each block runs in a fresh namespace, in a temporary working directory, with the names a
reader's training script already has (``READER_NAMES``: a tiny digits ``train_set`` and
``loader``, a tiny timm ``model``, ``opt``, ``cfg``, ...). HTML comments right above a fence
adjust one block (several may be stacked, each on its own line):

- ``<!-- doc-test: skip (reason) -->``: not run here; the reason is required and reported.
- ``<!-- doc-test: fixture NAME -->``: add a trainer's names (``transformers``: an HF ``model``,
  ``args``, a dict ``train_set``; ``accelerate``: an ``accelerator``).
- ``<!-- doc-test: continue -->``: run in the namespace the previous block left.
- ``<!-- doc-test: replace OLD => NEW -->``: tiny settings (fewer steps or images).
- ``<!-- doc-test: setup CODE -->``: names the text around the block defines in words.

``path/to/generator`` is always the digits generator shipped with hardneg.
"""

from __future__ import annotations

import re
import textwrap
import threading
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^(?P<indent>[ \t]*)```(?P<lang>[^\s`]*)[^\n]*$")
DIRECTIVE = re.compile(r"^\s*<!--\s*doc-test:\s*(?P<kind>\w+)\s*(?P<arg>.*?)\s*-->\s*$", re.S)


@dataclass
class Snippet:
    path: Path
    line: int  # 1-based line of the opening fence
    code: str
    skip: str | None = None
    fixtures: list[str] = field(default_factory=list)
    continues: bool = False
    replaces: list[tuple[str, str]] = field(default_factory=list)
    setup: list[str] = field(default_factory=list)

    @property
    def name(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"


def parse(path: Path) -> list[Snippet]:
    """The ```python fences of one markdown file, with the doc-test directives just above each."""
    lines = path.read_text(encoding="utf-8").splitlines()
    snippets: list[Snippet] = []
    i = 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        indent, start = m.group("indent"), i
        j = i + 1
        while j < len(lines) and not (lines[j].strip() == "```" and lines[j].startswith(indent)):
            j += 1
        if j == len(lines):
            raise AssertionError(f"{path}:{start + 1}: unclosed ``` fence")
        if m.group("lang") in ("python", "py", "python3"):
            code = textwrap.dedent("\n".join(lines[start + 1:j]))
            snippets.append(_with_directives(Snippet(path, start + 1, code), path, lines, start))
        i = j + 1
    return snippets


def _with_directives(snippet: Snippet, path: Path, lines: list[str], fence: int) -> Snippet:
    k = fence - 1
    while k >= 0 and (lines[k].strip().startswith("<!--") and "doc-test:" in lines[k]):
        d = DIRECTIVE.match(lines[k])
        if not d:
            raise AssertionError(f"{path}:{k + 1}: malformed doc-test directive {lines[k]!r} (one line each)")
        kind, arg = d.group("kind"), d.group("arg")
        if kind == "skip":
            reason = re.fullmatch(r"\((.+)\)", arg)
            if not reason:
                raise AssertionError(f"{path}:{k + 1}: a skip must give its reason: doc-test: skip (why)")
            snippet.skip = reason.group(1)
        elif kind == "fixture":
            snippet.fixtures.append(arg)
        elif kind == "continue":
            snippet.continues = True
        elif kind == "replace":
            old, sep, new = arg.partition(" => ")
            if not sep:
                raise AssertionError(f"{path}:{k + 1}: replace needs 'OLD => NEW'")
            snippet.replaces.append((old, new))
        elif kind == "setup":
            snippet.setup.insert(0, arg)
        else:
            raise AssertionError(f"{path}:{k + 1}: unknown doc-test directive {kind!r}")
        k -= 1
    for old, _ in snippet.replaces:
        if old not in snippet.code:
            raise AssertionError(f"{snippet.name}: replace target {old!r} is not in the block")
    return snippet


SNIPPETS = [s for p in DOCS for s in parse(p)]


def reader_names() -> dict:
    """What the reader's script has before a snippet: tiny data, model, optimiser, config."""
    import timm
    import torch.nn.functional as F
    from torch import nn

    from hardneg import HardNegConfig
    from hardneg.data import from_tensors, load_digits
    from hardneg.generators.class_conditional import ClassConditionalGenerator, default_digits_generator_path

    torch.manual_seed(0)
    full, test = load_digits(size=16)
    keep = torch.cat([torch.nonzero(full.labels == c)[:8, 0] for c in range(10)])
    train_set = from_tensors(full.images[keep], full.labels[keep], full.class_names)
    loader = torch.utils.data.DataLoader(train_set, batch_size=20, shuffle=True,
                                         generator=torch.Generator().manual_seed(0))
    model = timm.create_model("test_resnet", num_classes=10, in_chans=1)
    return {
        "torch": torch, "nn": nn, "F": F,
        "train_set": train_set, "test_set": test, "names": train_set.class_names, "loader": loader,
        "model": model, "opt": torch.optim.SGD(model.parameters(), lr=0.05), "K": 10,
        "net": nn.Sequential(nn.Flatten(), nn.Linear(256, 128)),  # an embedding network
        "cfg": HardNegConfig(num_classes=10, generator="class-conditional", refresh_every=2),
        "generator": ClassConditionalGenerator.load(default_digits_generator_path(), num_inference_steps=5),
        "GENERATOR_PATH": default_digits_generator_path(),
    }


def transformers_names(ns: dict, tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")

    class DictItems(torch.utils.data.Dataset):  # what an HF image pipeline yields
        def __init__(self, data):
            self.data = data

        def __len__(self):
            return len(self.data)

        def __getitem__(self, i):
            return {"pixel_values": self.data.images[i], "labels": int(self.data.labels[i])}

    vit = transformers.ViTConfig(image_size=16, patch_size=8, num_channels=1, hidden_size=16, num_hidden_layers=1,
                                 num_attention_heads=2, intermediate_size=32, num_labels=10)
    ns["model"] = transformers.ViTForImageClassification(vit)
    ns["train_set"] = DictItems(ns["train_set"])
    ns["args"] = transformers.TrainingArguments(output_dir=str(tmp_path / "hf"), use_cpu=True, report_to=[],
                                                per_device_train_batch_size=16, max_steps=4, save_steps=2,
                                                disable_tqdm=True, dataloader_num_workers=0, seed=0)


def accelerate_names(ns: dict, tmp_path: Path) -> None:
    pytest.importorskip("accelerate")
    from accelerate import Accelerator

    ns["accelerator"] = Accelerator(cpu=True)


FIXTURES = {"transformers": transformers_names, "accelerate": accelerate_names}
_namespaces: dict[str, dict] = {}  # the namespace each block left, for "continue"


def test_every_python_block_is_found():
    # a parser that silently finds nothing would pass every doc; README and both guides have blocks
    files = {s.path.name for s in SNIPPETS}
    assert {"README.md", "integrations.md", "methods.md"} <= files
    assert all(s.code.strip() for s in SNIPPETS)


def test_parser_reads_directives_and_indented_fences(tmp_path):
    doc = tmp_path / "x.md"
    doc.write_text("text\n<!-- doc-test: skip (needs a GPU) -->\n```python\nimport cuda_only\n```\n"
                   "```bash\nls\n```\n- item:\n\n  <!-- doc-test: replace 300 => 2 -->\n  ```python\n"
                   "  steps = 300\n  ```\n```diff\n+x\n```\n", encoding="utf-8")
    first, second = parse(doc)
    assert first.skip == "needs a GPU" and first.code == "import cuda_only"
    assert second.code == "steps = 300" and second.replaces == [("300", "2")] and second.skip is None
    doc.write_text("<!-- doc-test: skip -->\n```python\nx = 1\n```\n", encoding="utf-8")
    with pytest.raises(AssertionError, match="reason"):
        parse(doc)


def tiny_config_class():
    """``hardneg.HardNegConfig`` as the blocks import it, with tiny generation defaults.

    A block's own arguments win; only what it leaves at the default is made small, so a worker
    request takes a fraction of a second instead of a full 25-step schedule over 32 images.
    """
    from hardneg.config import HardNegConfig

    def tiny(*args, **kwargs):
        kwargs.setdefault("generator_steps", 2)
        kwargs.setdefault("images_per_refresh", 8)
        return HardNegConfig(*args, **kwargs)

    return tiny


@pytest.mark.parametrize("snippet", SNIPPETS, ids=[s.name for s in SNIPPETS])
def test_doc_block_runs(snippet: Snippet, tmp_path, monkeypatch, one_thread):
    if snippet.skip:
        pytest.skip(f"{snippet.name}: {snippet.skip}")
    import hardneg

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(hardneg, "HardNegConfig", tiny_config_class())
    if snippet.continues:
        prev = [s for s in SNIPPETS if s.path == snippet.path and s.line < snippet.line][-1]
        if prev.name not in _namespaces:
            pytest.skip(f"{snippet.name} continues {prev.name}, which did not run")
        ns = _namespaces[prev.name]
    else:
        ns = reader_names()
        for name in snippet.fixtures:
            FIXTURES[name](ns, tmp_path)
    code = snippet.code
    for old, new in snippet.replaces:
        code = code.replace(old, new)
    code = code.replace("path/to/generator", ns["GENERATOR_PATH"])
    ns["__name__"] = "__main__"
    before = set(threading.enumerate())
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for setup in snippet.setup:
                exec(compile(setup, f"{snippet.name} (setup)", "exec"), ns)
            exec(compile(code, snippet.name, "exec"), ns)
        if any(s.continues and s.path == snippet.path and s.line > snippet.line for s in SNIPPETS):
            _namespaces[snippet.name] = ns  # kept only for a block that continues it
    finally:
        created = [v for v in ns.values() if hasattr(v, "close") and type(v).__name__.startswith("HardNeg")]
        for engine in created:  # a snippet that builds an engine and stops early must not leak its worker
            try:
                engine.close()
            except Exception:
                pass
        if "accelerate" in snippet.fixtures:
            from accelerate.state import AcceleratorState

            AcceleratorState._reset_state(True)
    # an engine the block built but cannot reach any more (a name rebound) keeps its worker running
    for thread in set(threading.enumerate()) - before:
        if thread.name.startswith("hardneg"):
            thread.join(timeout=60)
            assert not thread.is_alive(), f"{snippet.name} leaves worker {thread.name} running: an engine not closed"
