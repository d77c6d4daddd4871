"""IdGlow Aesthetic Score: the LAION improved aesthetic predictor (CLIP ViT-L/14 + MLP), the paper's 'Aes'."""
from __future__ import annotations

import functools

from comfy_api.latest import io

import folder_paths

from idglow_core.aesthetic import AestheticScorer
from idglow_core.errors import ModelNotFoundError

from ._comfy import CATEGORY, progress, resolve_subfolder, subfolders
from ._convert import check_choice, image_batch_to_numpy

HEAD_FILE = "sac+logos+ava1-l14-linearMSE.pth"


def missing_model_message() -> str:
    """What to do when no aesthetic model is installed (the dropdown is empty)."""
    return (f"No aesthetic model is installed: the 'aesthetic' model folders {folder_paths.get_folder_paths('aesthetic')} "
            f"hold no scorer. Put {HEAD_FILE} and a CLIP ViT-L/14 folder in Hugging Face format "
            f"(openai/clip-vit-large-patch14) into ComfyUI/models/aesthetic/ (or one sub-folder of it) and refresh "
            f"the page. The FaceSim nodes do not need it: bypass this node (select it, Ctrl+B) to score without it.")


@functools.lru_cache(maxsize=1)
def _scorer(folder: str) -> AestheticScorer:
    """Loading CLIP ViT-L/14 takes seconds: keep the last scorer (one entry, so switching frees the old one)."""
    import comfy.model_management as mm
    return AestheticScorer.from_dir(folder, device=mm.get_torch_device())


class IdGlowAestheticScore(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="IdGlowAestheticScore", display_name="IdGlow Aesthetic Score", category=CATEGORY,
            is_output_node=True,
            description="LAION aesthetic score (about 1..10) of each image: CLIP ViT-L/14 image embedding -> MLP. "
                        "Needs models/aesthetic/ with sac+logos+ava1-l14-linearMSE.pth and a CLIP ViT-L/14 folder "
                        "in Hugging Face format (openai/clip-vit-large-patch14).",
            inputs=[
                io.Image.Input("images", tooltip="Images to score (a batch)."),
                io.Combo.Input("model", options=subfolders("aesthetic"),
                               tooltip="A folder in models/aesthetic holding the head and the CLIP folder "
                                       "('.' = models/aesthetic itself)."),
            ],
            outputs=[io.Float.Output(display_name="score", tooltip="Mean aesthetic score of the batch."),
                     io.String.Output(display_name="report", tooltip="Score of each image.")])

    @classmethod
    def validate_inputs(cls, model) -> bool | str:
        """Checked when the prompt is queued, before any node runs: an empty dropdown names the folder and files."""
        choices = subfolders("aesthetic")
        if not choices:
            return missing_model_message()
        return True if model in choices else f"'model' = {model!r} is not one of {choices} (folders in models/aesthetic)."

    @classmethod
    def execute(cls, images, model) -> io.NodeOutput:
        if not subfolders("aesthetic"):
            raise ModelNotFoundError(missing_model_message())
        check_choice("model", model, subfolders("aesthetic"))
        scorer = _scorer(resolve_subfolder("aesthetic", model))
        arrays = image_batch_to_numpy(images, "images")
        step = progress(len(arrays))
        scores = []
        for a in arrays:
            scores.append(float(scorer.score([a])[0]))
            step()
        mean = sum(scores) / len(scores)
        report = "; ".join(f"image {i + 1}: {s:.3f}" for i, s in enumerate(scores)) + f"; mean {mean:.3f}"
        return io.NodeOutput(mean, report, ui={"text": [report]})
