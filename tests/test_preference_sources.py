"""The generator side of pair building: IdGlowPipeline wrapped as generate(refs, prompt, seed, task)."""
from __future__ import annotations

import numpy as np
from idglow_core.adapter import IdGlowAdapter
from idglow_core.faces.base import Face
from idglow_core.pipeline import GenerateConfig, IdGlowPipeline
from idglow_core.preference import call_generator, pipeline_generator
from idglow_core.testing import small_edit_images, tiny_edit_pipeline


class _Analyzer:
    name, embedding_dim = "fake", 512

    def analyze(self, image):
        e = np.full(512, float(image.mean()) + 1.0, dtype=np.float32)
        return [Face(np.array([1, 2, 30, 35], np.float32), np.zeros((5, 2), np.float32), 0.9, e / np.linalg.norm(e))]


def test_pipeline_generator_is_seeded_and_passes_prompt_and_task():
    seen = []

    class Spy(IdGlowPipeline):  # records the config of every call, then generates for real
        def __call__(self, references, config=None, embeddings=None):
            seen.append(config)
            return super().__call__(references, config, embeddings)

    with small_edit_images():
        pipe = tiny_edit_pipeline()
        generate = pipeline_generator(Spy(pipe, IdGlowAdapter.init_for(pipe.transformer), analyzer=_Analyzer()),
                                      GenerateConfig(steps=2, height=32, width=32, true_cfg_scale=1.0,
                                                     negative_prompt=None))
        rng = np.random.default_rng(0)
        refs = [rng.integers(0, 256, (40, 40, 3), dtype=np.uint8) for _ in range(2)]
        a = call_generator(generate, refs, "two people at a picnic", 0, "age")
        b = generate(refs, "two people at a picnic", 0)
        b2 = generate(refs, "two people at a picnic", 0)
        c = generate(refs, "two people at a picnic", 1)
    assert a.shape == (32, 32, 3) and a.dtype == np.uint8
    assert [(s.prompt, s.seed, s.task, s.steps) for s in seen] == [
        ("two people at a picnic", 0, "age", 2), ("two people at a picnic", 0, "group", 2),
        ("two people at a picnic", 0, "group", 2), ("two people at a picnic", 1, "group", 2)]
    assert np.array_equal(b, b2) and not np.array_equal(b, c)  # seeded: same seed, same image


def test_call_generator_passes_task_only_when_accepted():
    got = []
    call_generator(lambda refs, prompt, seed: got.append((prompt, seed)), [], "p", 3, "age")
    call_generator(lambda refs, prompt, seed, task="group": got.append((prompt, seed, task)), [], "p", 4, "age")
    assert got == [("p", 3), ("p", 4, "age")]
