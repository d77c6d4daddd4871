"""The paper's benchmark (Sec. 4.1) around :mod:`idglow_core.evaluate`.

- :mod:`.build`: identity portraits -> seeded test sets (k in {2, 3}), the same identity sets for Task 1 and
  Task 2, static and dynamic prompts -> ``bench.jsonl``;
- :mod:`.run`: generate every row with a method (:mod:`.pipeline_method` for IdGlowPipeline, :mod:`.comfy` for
  any ComfyUI workflow over HTTP), resumable and sharded, -> ``runs/<method>/manifest.jsonl`` and
  ``generated.jsonl`` that ``evaluate`` reads;
- :mod:`.copypaste`: MultiID-Bench's copy-paste measure for rows with a ground-truth photo.
"""
