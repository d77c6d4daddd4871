"""Encoding that scales (issue 12, point 8): the encodings go to disk as bf16 safetensors (keyed by content as
before), ranks split the encoding, training reads samples lazily, and the text encoder is gone before training.
"""
from __future__ import annotations

import weakref

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from idglow_core.faces.base import Face
from idglow_core.training.data import Sample
from idglow_core.training.encode import LazyEncodings, SampleEncoder, encode_sharded, free_text_encoder

AREAS = (32 * 32, 32 * 32)


def _samples(folder, n: int) -> list[Sample]:
    rng = np.random.default_rng(0)
    kps = np.array([[12, 14], [28, 14], [20, 22], [14, 30], [26, 30]], np.float32)
    out = []
    for i in range(n):
        paths = []
        for name in (f"t{i}.png", f"a{i}.png", f"b{i}.png"):
            Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(folder / name)
            paths.append(folder / name)
        faces = [Face(np.array([0, 0, 32, 32], np.float32), kps, 1.0, rng.normal(size=8).astype(np.float32))
                 for _ in range(2)]
        out.append(Sample(line=i + 1, target=paths[0], refs=paths[1:], prompt=f"photo {i}", task="group",
                          ref_faces=faces))
    return out


class CountingEncoder(SampleEncoder):
    """Records which samples went through the VAE / text encoder."""

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        self.lines: list[int] = []

    def _encode(self, s):
        self.lines.append(s.line)
        return super()._encode(s)


class FakeAccelerator:
    """Rank ``rank`` of ``world``; ``others_failed`` adds the failure flag of another rank to the reduction."""

    def __init__(self, rank: int, world: int, others_failed: bool = False):
        self.process_index, self.num_processes, self.device = rank, world, torch.device("cpu")
        self.others_failed, self.reduced = others_failed, 0

    def reduce(self, tensor, reduction="sum"):
        self.reduced += 1
        return tensor + float(self.others_failed)


@pytest.fixture(scope="module")
def pipe():
    from idglow_core.testing import tiny_edit_pipeline

    return tiny_edit_pipeline(text_encoder=True)


def test_cache_holds_bf16_files_and_reads_are_lazy(pipe, tmp_path):
    samples = _samples(tmp_path, 3)
    encoder = CountingEncoder(pipe, None, 32, cache_dir=tmp_path / "cache", areas=AREAS)
    encode_sharded(samples, encoder.ensure)
    files = sorted((tmp_path / "cache").glob("*.safetensors"))
    assert len(files) == 3 and encoder.lines == [1, 2, 3]
    stored = load_file(str(encoder.cache_path(samples[1])))
    assert stored["latents"].dtype == torch.bfloat16 and stored["prompt_embeds"].dtype == torch.bfloat16
    assert stored["prompt_mask"].dtype == torch.int64
    lazy = LazyEncodings(samples, encoder.load)
    assert len(lazy) == 3 and encoder._ids == {}  # nothing loaded yet
    item = lazy[1]
    assert item["latents"].dtype == torch.float32 and torch.equal(item["latents"], stored["latents"].float())
    assert torch.equal(item["id_embeds"], torch.from_numpy(np.stack([f.embedding for f in samples[1].ref_faces])))
    assert lazy[1] is not item and torch.equal(lazy[1]["prompt_embeds"], item["prompt_embeds"])  # re-read
    assert [x["prompt_mask"].sum() > 0 for x in lazy[:2]] == [True, True] and torch.equal(lazy[-1]["latents"],
                                                                                         lazy[2]["latents"])
    again = CountingEncoder(pipe, None, 32, cache_dir=tmp_path / "cache", areas=AREAS)  # a rerun: all cached
    encode_sharded(samples, again.ensure)
    assert again.lines == [] and torch.equal(LazyEncodings(samples, again.load)[0]["latents"], lazy[0]["latents"])


def test_ranks_split_the_encoding_and_read_each_others_files(pipe, tmp_path):
    samples = _samples(tmp_path, 5)
    ranks = [CountingEncoder(pipe, None, 32, cache_dir=tmp_path / "cache", areas=AREAS) for _ in range(2)]
    for r, encoder in enumerate(ranks):
        acc = FakeAccelerator(r, 2)
        encode_sharded(samples, encoder.ensure, acc)
        assert acc.reduced == 1  # every rank takes part in the failure check (the barrier)
    assert ranks[0].lines == [1, 3, 5] and ranks[1].lines == [2, 4]
    lazy = LazyEncodings(samples, ranks[1].load)
    assert all(item["latents"].shape == (4, 1, 8, 8) for item in lazy[:])  # rank 1 reads rank 0's files
    assert ranks[1].lines == [2, 4]


def test_a_cache_folder_other_ranks_cannot_see_is_refused(pipe, tmp_path):
    """Rank 0 of 2 with a node-local folder: rank 1's samples never appear there, which must fail loudly at
    once, not when a step first needs one."""
    from idglow_core.errors import ConfigError
    from idglow_core.training.encode import shard_needs_encoding

    samples = _samples(tmp_path, 3)
    encoder = SampleEncoder(pipe, None, 32, cache_dir=tmp_path / "local", areas=AREAS)
    assert shard_needs_encoding(samples, encoder.is_cached, FakeAccelerator(0, 2))
    with pytest.raises(ConfigError, match="every node shares"):
        encode_sharded(samples, encoder.ensure, FakeAccelerator(0, 2), encoder.is_cached)
    assert not shard_needs_encoding(samples, encoder.is_cached, FakeAccelerator(0, 2))  # its share is there
    assert shard_needs_encoding(samples, encoder.is_cached, FakeAccelerator(1, 2))      # rank 1's is not
    encode_sharded(samples, encoder.ensure, None, encoder.is_cached)  # one process sees everything


def test_a_failing_rank_makes_every_rank_raise(pipe, tmp_path):
    from idglow_core.errors import ConfigError, ImageReadError

    samples = _samples(tmp_path, 2)
    encoder = SampleEncoder(pipe, None, 32, cache_dir=tmp_path / "cache", areas=AREAS)
    with pytest.raises(ConfigError, match="another process"):  # this rank is fine, rank 1 failed
        encode_sharded(samples, encoder.ensure, FakeAccelerator(0, 2, others_failed=True))
    (tmp_path / "b1.png").write_bytes(b"not an image")  # sample 2's reference, rank 1's share
    acc = FakeAccelerator(1, 2)
    with pytest.raises(ImageReadError):
        encode_sharded(samples, SampleEncoder(pipe, None, 32, cache_dir=tmp_path / "c2", areas=AREAS).ensure, acc)
    assert acc.reduced == 1  # it told the others before raising


def test_free_text_encoder_releases_it(pipe):
    from idglow_core.testing import tiny_edit_pipeline

    p = tiny_edit_pipeline(text_encoder=True)
    ref = weakref.ref(p.text_encoder)
    free_text_encoder(p)
    assert p.text_encoder is None and ref() is None
    free_text_encoder(p)  # idempotent


def test_sft_trains_without_the_text_encoder_on_lazy_encodings(tmp_path, monkeypatch):
    """run_sft: by the time the loop starts, the text encoder object is gone and the samples are lazy."""
    from idglow_core.testing import OneFaceAnalyzer
    from idglow_core.training import load_config, models, sft
    from idglow_core.training.loop import LoopResult

    seen = {}
    build = models.build_pipeline

    def recording_build(cfg, text_encoder=True):
        p = build(cfg, text_encoder=text_encoder)
        seen["loaded_te"] = p.text_encoder is not None
        seen["te"] = weakref.ref(p.text_encoder) if p.text_encoder is not None else lambda: None
        return p

    def fake_loop(cfg, parts, resume_from=None, accelerator=None):
        seen["te_alive"] = seen["te"]() is not None
        seen["samples"] = parts.samples
        return LoopResult(step=0, final_dir=None, history=[])

    monkeypatch.setattr(models, "build_pipeline", recording_build)
    monkeypatch.setattr(sft, "run_loop", fake_loop)
    cfg = load_config("train/configs/tiny_cpu.yaml", [f"run.output_dir={tmp_path / 'run'}", "data.synthetic=2",
                                                      "run.tensorboard=false", "run.validate_every=0"])
    sft.run_sft(cfg, analyzer=OneFaceAnalyzer())
    assert seen["loaded_te"] and seen["te_alive"] is False
    first = seen["samples"]
    assert isinstance(first.items, LazyEncodings) and len(first) == 2   # task-tagged, read lazily
    assert len(list((tmp_path / "run" / "cache").glob("*.safetensors"))) == 2  # default cache: <output>/cache
    cfg.run.overwrite = True  # a rerun: every prompt is cached, so the text encoder is never loaded
    sft.run_sft(cfg, analyzer=OneFaceAnalyzer())
    assert seen["loaded_te"] is False and torch.equal(seen["samples"][1]["prompt_embeds"], first[1]["prompt_embeds"])
