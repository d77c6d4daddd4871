"""SFT data from a photo collection (``train/make_sft_data.py``): build -> review by a person -> apply.

- :mod:`.scan`: read every photo, drop near-duplicates (difference hash), detect and embed every face, crop
  reference portraits;
- :mod:`.cluster`: group faces into identities (average linkage at the backend's same-person cosine; two faces
  of one photo are never one person);
- :mod:`.rows`: SFT rows (target = a photo with 2-4 faces, refs = portraits of the same people cut from *other*
  photos), prompts, the train/val split by identity;
- :mod:`.review`: the static review page (clusters and rows) and the decisions it downloads;
- :mod:`.build`: the two steps, :func:`build_sft_data` and :func:`apply_review`, and the files they write.
"""
from .build import SftDataConfig, apply_review, build_sft_data

__all__ = ["SftDataConfig", "build_sft_data", "apply_review"]
