"""The tree's layout rules (issue 19): file sizes, TF-free kernels, one family per file, and the
paths README's layout block and docs/adding-a-loss.md name."""

import re

import pytest
from support import ROOT

FAMILIES = ("distances", "pairs", "in_batch")
MAX_LINES = 700
SOURCE_SUFFIXES = (".h", ".cc", ".cuh", ".py")


def _sources(*roots):
    for root in roots:
        for path in sorted((ROOT / root).rglob("*")):
            if path.is_file() and path.name.endswith(SOURCE_SUFFIXES):
                yield path


@pytest.mark.parametrize("root", ["cc", "python"])
def test_no_source_file_is_over_700_lines(root):
    sizes = {str(p.relative_to(ROOT)): len(p.read_text().splitlines()) for p in _sources(root)}
    assert sizes, root
    assert {path: n for path, n in sizes.items() if n > MAX_LINES} == {}


def _includes(path):
    """(header, quoted) of each #include line of `path`."""
    for line in path.read_text().splitlines():
        match = re.match(r'\s*#\s*include\s*([<"])([^>"]+)[>"]', line)
        if match:
            yield match.group(2), match.group(1) == '"'


def test_the_kernels_include_no_tensorflow_or_xla_header():
    includes = {}
    for path in _sources("cc/core"):
        for key in _includes(path):
            includes.setdefault(key, []).append(str(path.relative_to(ROOT)))
    assert includes, "no includes found under cc/core"
    foreign = {
        header: files
        for (header, _), files in includes.items()
        if re.match(r"(tensorflow|xla|absl|tsl|third_party|unsupported)/", header)
    }
    assert foreign == {}
    # Kernel headers include each other by their path from cc/ only.
    local = [h for h, quoted in includes if quoted and "/" not in h]
    assert local == []


def _includes_of(path, seen):
    """Every header `path` includes, following the tree's own headers (cc/...)."""
    for header, quoted in _includes(path):
        if quoted and header not in seen:
            seen.add(header)
            own = ROOT / "cc" / header
            if own.is_file():
                _includes_of(own, seen)
    return seen


def test_the_ffi_handlers_include_no_tensorflow():
    # They serve JAX too, where there is no TensorFlow (and xla_op_kernel.h
    # takes about 40 s per file to compile): XLA's FFI API only.
    handlers = sorted((ROOT / "cc/ffi").glob("*"))
    assert len(handlers) >= 5
    foreign = {
        str(p.relative_to(ROOT)): sorted(
            h
            for h in _includes_of(p, set())
            if re.match(r"(tensorflow|absl|tsl|tf)/|xla/(?!ffi/api/)", h)
        )
        for p in handlers
    }
    assert {path: found for path, found in foreign.items() if found} == {}


def _layout_block():
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Layout and architecture", 1)[1]
    return section.split("```", 2)[1]


def test_every_path_the_readme_layout_names_exists():
    paths = [line.split()[0] for line in _layout_block().splitlines() if line.strip()]
    assert len(paths) > 10, paths
    missing = [p for p in paths if not any((ROOT / q.rstrip(",")).exists() for q in p.split(","))]
    assert missing == []


def test_adding_a_loss_names_files_every_family_has():
    text = (ROOT / "docs/adding-a-loss.md").read_text()
    named = set(re.findall(r"`((?:cc|tests|python|benchmarks)/[^`]+)`", text))
    assert any("<family>" in p for p in named)
    for family in FAMILIES:
        for path in named:
            concrete = path.replace("<family>", family)
            # Optional files ("when the family has math of its own", "if XLA's CPU backend
            # calls the CPU kernel") are there for the families that need them.
            if concrete.endswith(("/math.h", "ffi/distances.cc")) and family == "distances":
                continue
            assert (ROOT / concrete).exists(), concrete


@pytest.mark.parametrize("family", FAMILIES)
def test_no_file_under_cc_mixes_families(family):
    # A family's own files name only its own kernels: the kernel entry points
    # of the other families appear in shared files only (the registration
    # table and the pybind11 module's list of registrations).
    entry = {"distances": "ContrastiveLoss", "pairs": "EmbeddingLoss", "in_batch": "InBatchLoss"}
    own = [p for p in _sources("cc") if family in p.relative_to(ROOT).parts or p.stem == family]
    assert own, family
    for path in own:
        # Comments may compare with another family; code may not name it.
        text = "\n".join(line.split("//")[0] for line in path.read_text().splitlines())
        for other, name in entry.items():
            if other != family:
                assert not re.search(rf"\b{name}(Reduced)?(Cpu|Gpu)\s*\(", text), (path, other)
