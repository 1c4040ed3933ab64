"""SparseLinear's CPU components in transparent huge pages (flashsparse.hugepages)."""

from __future__ import annotations

import copy
import io

import pytest
import torch

import flashsparse as fs
from flashsparse import hugepages
from tests.helpers import random_weight

HUGE = hugepages.HUGE_PAGE
needs_thp = pytest.mark.skipif(
    not hugepages._system_supports(), reason="needs Linux with transparent huge pages"
)


def _vma_flags(ptr: int) -> dict[str, str]:
    """The /proc/self/smaps fields of the mapping holding address ``ptr``."""
    fields: dict[str, str] = {}
    inside = False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()[0]
            if "-" in head and not head.endswith(":"):
                lo, hi = (int(a, 16) for a in head.split("-"))
                inside = lo <= ptr < hi
            elif inside:
                key, _, value = line.partition(":")
                fields[key] = value.strip()
    return fields


def _big_components(layer: fs.SparseLinear) -> list[torch.Tensor]:
    return [t for t in (layer._component(n) for n in layer._components) if t.nbytes >= HUGE]


@needs_thp
@pytest.mark.parametrize("quant", [None, "int8"])
def test_large_components_land_in_advised_aligned_memory(quant, monkeypatch):
    monkeypatch.delenv(hugepages.ENV_VAR, raising=False)
    w = random_weight(2053, 1999, 0.3, torch.bfloat16, "row_skewed", seed=3)
    layer = fs.SparseLinear.from_dense(w, quant=quant)
    big = _big_components(layer)
    assert big, "the test weight must have components of 2 MiB or more"
    for t in big:
        assert t.data_ptr() % HUGE == 0 and t.untyped_storage().nbytes() == t.nbytes
        # THPeligible: the kernel may back the mapping with huge pages (madvise took effect)
        assert _vma_flags(t.data_ptr()).get("THPeligible") == "1"
    # same weight as without: the copy changed placement only
    monkeypatch.setenv(hugepages.ENV_VAR, "0")
    plain = fs.SparseLinear.from_dense(w, quant=quant)
    for name in layer._components:
        assert torch.equal(layer._component(name), plain._component(name))
    x = torch.randn(3, 1999, dtype=torch.bfloat16)
    assert torch.equal(layer(x), plain(x))
    ref = x.double() @ plain.sparse_weight.to_dense().double().T
    assert ((layer(x).double() - ref).norm() / ref.norm()).item() < 1e-2


def test_turned_off_small_or_unfit_tensors_are_left_alone(monkeypatch):
    big = torch.randn(HUGE // 4 + 5)
    for off in ("0", "off", "False", " no "):
        monkeypatch.setenv(hugepages.ENV_VAR, off)
        assert not hugepages.enabled() and hugepages.in_huge_pages(big) is big
    monkeypatch.delenv(hugepages.ENV_VAR)
    small = torch.randn(1000)
    assert hugepages.in_huge_pages(small) is small
    wanting_grad = torch.randn(HUGE // 4 + 5, requires_grad=True)
    assert hugepages.in_huge_pages(wanting_grad) is wanting_grad
    param = torch.nn.Parameter(torch.randn(HUGE // 4 + 5), requires_grad=False)
    assert hugepages.in_huge_pages(param) is param  # a subclass keeps its identity
    meta = torch.empty(HUGE, device="meta")
    assert hugepages.in_huge_pages(meta) is meta


@needs_thp
@pytest.mark.parametrize("dtype", [torch.int64, torch.uint8, torch.bfloat16, torch.float8_e4m3fn])
def test_copy_is_exact_for_any_dtype_and_layout(dtype):
    g = torch.Generator().manual_seed(1)
    src = torch.randint(-100, 100, (1031, 613 * 8), generator=g).to(dtype)
    strided = src[:, ::2]  # not contiguous: the copy is
    for t in (src, strided):
        out = hugepages.in_huge_pages(t)
        assert out is not t and out.is_contiguous() and out.data_ptr() % HUGE == 0
        assert out.dtype == t.dtype and out.shape == t.shape
        assert torch.equal(out.view(torch.uint8), t.contiguous().view(torch.uint8))
        assert hugepages.in_huge_pages(out) is out  # no second copy


@needs_thp
def test_deepcopy_save_load_and_state_dict_keep_working(tmp_path):
    w = random_weight(2100, 2048, 0.4, torch.float32, "dense_tiles", seed=5)
    layer = fs.SparseLinear.from_dense(w, torch.randn(2100))
    clone = copy.deepcopy(layer)
    for a, b in zip(_big_components(layer), _big_components(clone), strict=True):
        assert b.data_ptr() % HUGE == 0 and b.data_ptr() != a.data_ptr() and torch.equal(a, b)
    assert clone.bias is not layer.bias and torch.equal(clone.bias, layer.bias)
    x = torch.randn(2, 2048)
    assert torch.equal(clone(x), layer(x))
    # torch.save writes the tensors' bytes, not their mappings' (no 2 MiB of padding each)
    buf = io.BytesIO()
    torch.save(layer.state_dict(), buf)
    assert buf.tell() < sum(t.nbytes for t in layer.state_dict().values()) + (1 << 16)
    buf.seek(0)
    target = fs.SparseLinear.from_dense(random_weight(2100, 2048, 0.9, seed=6), torch.zeros(2100))
    target.load_state_dict(torch.load(buf))  # another nonzero count: components re-made
    assert torch.equal(target(x), layer(x))
    for t in _big_components(target):
        assert t.data_ptr() % HUGE == 0
    path = tmp_path / "model.safetensors"
    fs.save_sparse(torch.nn.Sequential(layer), path)
    with torch.device("meta"):
        model = torch.nn.Sequential(torch.nn.Linear(2048, 2100))
    fs.load_sparse(model, path)
    assert torch.equal(model(x), layer(x))
    for t in _big_components(model[0]):
        assert t.data_ptr() % HUGE == 0


def test_never_setting_and_failed_mappings_leave_tensors_alone(tmp_path, monkeypatch):
    big = torch.randn(HUGE // 4 + 5)
    setting = tmp_path / "enabled"
    setting.write_text("always madvise [never]\n")
    monkeypatch.setattr(hugepages, "_THP_SETTING", str(setting))
    monkeypatch.setattr(hugepages, "_supported", None)
    assert not hugepages.enabled() and hugepages.in_huge_pages(big) is big
    setting.write_text("always [madvise] never\n")
    monkeypatch.setattr(hugepages, "_supported", None)
    if not hugepages._system_supports():
        pytest.skip("needs Linux (mmap.MADV_HUGEPAGE)")

    def refuse(*args, **kwargs):
        raise OSError(12, "Cannot allocate memory")  # e.g. vm.max_map_count reached

    monkeypatch.setattr(hugepages.mmap, "mmap", refuse)
    assert hugepages.in_huge_pages(big) is big
    layer = fs.SparseLinear.from_dense(random_weight(2100, 2048, 0.4, seed=7))
    x = torch.randn(2, 2048)
    ref = x.double() @ layer.sparse_weight.to_dense().double().T
    assert ((layer(x).double() - ref).norm() / ref.norm()).item() < 1e-5
