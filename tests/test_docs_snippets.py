"""Every ```python snippet in README.md, docs/ and benchmarks/ Markdown runs, as written.

The convention (also in docs/architecture.md, "Code in the docs"):

- A ```python fence is a complete program: its own imports, no names from another snippet. Each
  one runs in a fresh namespace, in a fresh temporary working directory (so relative paths such as
  "adapter/" are its own), with the test suite's seeds. A bare `...` statement (a no-op) may stand
  for "your training loop"; anything else must be real code that runs in seconds on a CPU.
- Hugging Face model ids are the only placeholders. `from_pretrained(<id>)` with an id listed in
  TINY_MODELS below loads, instead of the Hub checkpoint, a tiny random-init model of the same
  architecture, written locally from its config and loaded through transformers' real
  `from_pretrained` (so `num_labels=`, `quantization_config=`, ... behave as they do for the real
  checkpoint); `AutoTokenizer.from_pretrained(<id>)` gets a byte-level tokenizer that encodes any
  text. Every such load is seeded the same, so two loads give the same model, as two loads of one
  Hub checkpoint do. An id not in the table fails the test: add a tiny config for it.
- Code that is not meant to run (shell commands, output, signatures, file layouts) uses another
  fence language (```bash, ```text); every fence names its language, so none hides untested Python.
"""
import os
import re
import subprocess
from pathlib import Path

import pytest
import torch
import transformers
from transformers.models.auto import modeling_auto  # noqa: F401  (defines every Auto class)
from transformers.models.auto.auto_factory import _BaseAutoModelClass

os.environ.setdefault("HF_HUB_OFFLINE", "1")

ROOT = Path(__file__).resolve().parents[1]
PYTHON = {"python", "py", "python3"}
LANGUAGES = PYTHON | {"bash", "text"}


VOCAB = 384  # 256 byte symbols + specials fit, so the tiny tokenizer can encode any text


def _tiny_bert():
    config = transformers.BertConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=128, max_position_embeddings=64)
    return transformers.BertModel(config)


def _tiny_llama():
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                      tie_word_embeddings=True, pad_token_id=0, eos_token_id=1, bos_token_id=None)
    return transformers.LlamaForCausalLM(config)


# Hub id -> a builder of a tiny model of the same architecture. Sizes are multiples of 64 so that
# bitsandbytes' NF4 blocks (64) divide every in_features, as they do on the real models.
TINY_MODELS = {
    "sentence-transformers/all-MiniLM-L6-v2": _tiny_bert,  # BERT encoder (MiniLM-L6)
    "HuggingFaceTB/SmolLM2-135M": _tiny_llama,  # Llama decoder, tied embeddings
}


def _tiny_tokenizer() -> transformers.PreTrainedTokenizerFast:
    """Byte-level BPE without merges: one token per byte, ids 0-2 the pad, eos and unk tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {token: i for i, token in enumerate(["<pad>", "<eos>", "<unk>", *sorted(alphabet)])}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>",
                                                unk_token="<unk>")


def markdown_files() -> list[Path]:
    return [ROOT / "README.md", *sorted(ROOT.glob("docs/**/*.md")), *sorted(ROOT.glob("benchmarks/**/*.md"))]


def fences(path: Path) -> list[tuple[int, str, str]]:
    """Every fenced block of `path` as (line of the opening fence, language, code)."""
    blocks, opened = [], None
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        match = re.match(r"\s*```(.*)$", line)
        if not match:
            if opened:
                opened[2].append(line)
        elif opened is None:
            opened = (number, match.group(1).strip(), [])
        else:
            where = f"{path.relative_to(ROOT)}:{number}"
            assert not match.group(1).strip(), f"{where}: a fence opens inside the block of line {opened[0]}"
            blocks.append((opened[0], opened[1], "\n".join(opened[2])))
            opened = None
    assert opened is None, f"{path.relative_to(ROOT)}:{opened[0]}: fence never closed"
    return blocks


SNIPPETS = [
    pytest.param(path, line, code, id=f"{path.relative_to(ROOT)}:{line}")
    for path in markdown_files() for line, language, code in fences(path) if language in PYTHON
]


def test_every_fence_names_a_known_language():
    unnamed = [f"{path.relative_to(ROOT)}:{line} ```{language}" for path in markdown_files()
               for line, language, _ in fences(path) if language not in LANGUAGES]
    assert not unnamed, f"fences need one of {sorted(LANGUAGES)} (python runs in this test): {unnamed}"


def test_the_docs_have_snippets():
    # the README's Quickstart, docs/usage.md, docs/peft.md and docs/quantization.md at least
    files = {snippet.values[0].name for snippet in SNIPPETS}
    assert {"README.md", "usage.md", "peft.md", "quantization.md"} <= files


@pytest.fixture(scope="module")
def tiny_checkpoints(tmp_path_factory):
    """Hub id -> a local checkpoint directory of its tiny model (seeded, written once)."""
    root = tmp_path_factory.mktemp("tiny_models")
    paths = {}
    for i, (model_id, build) in enumerate(TINY_MODELS.items()):
        torch.manual_seed(i)
        paths[model_id] = root / model_id.replace("/", "--")
        build().save_pretrained(paths[model_id])
        _tiny_tokenizer().save_pretrained(paths[model_id])
    return paths


@pytest.fixture
def hub_ids_are_tiny_models(monkeypatch, tiny_checkpoints):
    """`from_pretrained(<Hub id>)` on every Auto class (models, tokenizer, processor, config) and model
    class loads the tiny checkpoint."""
    def redirect(original):
        def from_pretrained(cls, name, *args, **kwargs):
            if str(name) in tiny_checkpoints:
                name = tiny_checkpoints[str(name)]
                torch.manual_seed(0)  # heads the checkpoint lacks: the same init at every load
            elif not Path(name).exists():
                raise AssertionError(f"a snippet loads {name!r}: add a tiny config for it to TINY_MODELS "
                                     "in tests/test_docs_snippets.py")
            return original.__func__(cls, name, *args, **kwargs)
        return classmethod(from_pretrained)

    # each Auto class carries its own copy of the method (transformers' auto_class_update)
    auto = [transformers.AutoTokenizer, transformers.AutoProcessor, transformers.AutoConfig]
    for owner in auto + subclasses(_BaseAutoModelClass) + subclasses(transformers.PreTrainedModel):
        if "from_pretrained" in owner.__dict__:
            monkeypatch.setattr(owner, "from_pretrained", redirect(owner.__dict__["from_pretrained"]))


def subclasses(cls: type) -> list[type]:
    """`cls` and every class below it that is defined now."""
    found = [cls]
    for sub in cls.__subclasses__():
        found += [c for c in subclasses(sub) if c not in found]
    return found


@pytest.mark.parametrize("path,line,code", SNIPPETS)
def test_snippet_runs(path, line, code, tmp_path, monkeypatch, hub_ids_are_tiny_models):
    monkeypatch.chdir(tmp_path)
    # blank lines in front, so a traceback's line number is the line in the Markdown file
    program = compile("\n" * line + code, str(path), "exec")
    exec(program, {"__name__": "__snippet__"})


def tracked_files() -> list[Path]:
    listed = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    return [ROOT / name for name in listed.decode().split("\0") if name]


# Paths of the machine the project was written on, and team notes that are not part of the
# repository. Spelled in pieces, so that this file does not cite them itself.
OUTSIDE = ["/" + "work/", "shared" + "/", "DESIGN" + ".md", "METHODS" + ".md"]


def test_no_tracked_file_cites_a_path_outside_the_repository():
    hits = []
    for path in tracked_files():
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, FileNotFoundError):
            continue  # binary (a plot), or deleted in the working tree
        for number, line in enumerate(text.splitlines(), start=1):
            hits += [f"{path.relative_to(ROOT)}:{number}: {token}" for token in OUTSIDE if token in line]
    assert not hits, "files cite paths outside the repository:\n" + "\n".join(hits)
