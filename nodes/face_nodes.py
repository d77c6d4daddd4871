"""Face nodes: load an analyzer, encode reference identities, score generated images (FaceSim)."""
from __future__ import annotations

import math

import folder_paths
from comfy_api.latest import io

from idglow_core.errors import ModelNotFoundError
from idglow_core.faces import BACKENDS, load_analyzer
from idglow_core.faces.insightface_backend import find_buffalo_dir

from ._comfy import CATEGORY, FaceAnalyzerType, IdsType, progress, reference_image_inputs
from ._convert import check_choice, collect_references, image_batch_to_numpy, numpy_to_image_batch
from ._ops import annotate, encode_identities, score_images

PROVIDERS = ("auto", "cpu", "cuda")
DET_SIZES = (320, 480, 640, 800, 960, 1024)
FACE_CHOICES = ("largest", "index")


def find_insightface_dir():
    """The first ComfyUI ``insightface`` model path holding buffalo_l's two files, else None."""
    for root in folder_paths.get_folder_paths("insightface"):
        try:
            return find_buffalo_dir(root)
        except ModelNotFoundError:
            continue
    return None


class IdGlowFaceAnalyzerLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="IdGlowFaceAnalyzerLoader", display_name="IdGlow Face Analyzer Loader", category=CATEGORY,
            description="Loads the face detector + embedder used to encode reference identities and to score "
                        "results. 'insightface' (buffalo_l in models/insightface) is the paper's ArcFace; 'dlib' "
                        "works offline with weights from PyPI; 'auto' takes insightface when its files exist.",
            inputs=[
                io.Combo.Input("backend", options=list(BACKENDS), default="auto",
                               tooltip="auto: insightface if models/insightface holds buffalo_l, else dlib. "
                                       "Identities and scores are only comparable within one backend."),
                io.Combo.Input("provider", options=list(PROVIDERS), default="auto",
                               tooltip="onnxruntime device for insightface (auto = CUDA when available). "
                                       "Ignored by dlib."),
                io.Combo.Input("det_size", options=list(DET_SIZES), default=640,
                               tooltip="insightface detector input size in pixels; larger finds smaller faces, slower."),
            ],
            outputs=[FaceAnalyzerType.Output(display_name="analyzer", tooltip="Face analyzer for IdGlow nodes.")])

    @classmethod
    def execute(cls, backend: str, provider: str, det_size: int) -> io.NodeOutput:
        check_choice("backend", backend, BACKENDS)
        check_choice("provider", provider, PROVIDERS)
        check_choice("det_size", int(det_size), DET_SIZES)
        folder = find_insightface_dir()
        if backend == "insightface" and folder is None:
            raise ModelNotFoundError(
                f"backend 'insightface' needs det_10g.onnx and w600k_r50.onnx (buffalo_l) in one of the ComfyUI "
                f"'insightface' folders {folder_paths.get_folder_paths('insightface')}, e.g. "
                f"models/insightface/models/buffalo_l/. Put them there, or choose backend 'dlib'.")
        if backend == "auto":
            backend = "insightface" if folder is not None else "dlib"
        analyzer = load_analyzer(backend, model_dir=folder, providers=None if provider == "auto" else provider,
                                 det_size=int(det_size))
        return io.NodeOutput(analyzer)


class IdGlowMultiIDEncode(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="IdGlowMultiIDEncode", display_name="IdGlow Multi-ID Encode", category=CATEGORY,
            description="Finds one face per reference image and embeds it (ArcFace with insightface). The order of "
                        "the references is the order of the identities: Picture 1, Picture 2, ... in the prompt.",
            inputs=[
                FaceAnalyzerType.Input("analyzer", tooltip="From IdGlow Face Analyzer Loader."),
                *reference_image_inputs("A batch of reference portraits, one person per image (same size).",
                                        "Reference portrait {i} (any size), after those of 'images'."),
                io.Combo.Input("face", options=list(FACE_CHOICES), default="largest",
                               tooltip="Which face of each reference to use: the largest, or the one at "
                                       "'face_index' counted left to right."),
                io.Int.Input("face_index", default=0, min=0, max=32,
                             tooltip="Used when face = index: 0 is the leftmost face of each reference image."),
            ],
            outputs=[IdsType.Output(display_name="ids", tooltip="k identity embeddings, in reference order."),
                     io.Image.Output(display_name="aligned_faces",
                                     tooltip="The aligned 112x112 face crops, one per identity, in order.")])

    @classmethod
    def execute(cls, analyzer, face: str, face_index: int, images=None, image1=None, image2=None, image3=None,
                image4=None) -> io.NodeOutput:
        check_choice("face", face, FACE_CHOICES)
        refs = collect_references(images, [image1, image2, image3, image4])
        ids = encode_identities(analyzer, refs, None if face == "largest" else int(face_index),
                                on_image=progress(len(refs)))
        return io.NodeOutput(ids, numpy_to_image_batch(ids.crops))


class IdGlowFaceSim(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="IdGlowFaceSim", display_name="IdGlow FaceSim", category=CATEGORY, is_output_node=True,
            description="Scores generated images against the reference identities: faces are matched one-to-one "
                        "to references (Hungarian, paper Eq. 2). 'strict' averages over all references (a missing "
                        "face counts 0); 'matched' averages over matched pairs only.",
            inputs=[
                FaceAnalyzerType.Input("analyzer", tooltip="The same analyzer (backend) that encoded the references."),
                io.Image.Input("images", tooltip="Generated images to score (a batch)."),
                io.Image.Input("references", optional=True,
                               tooltip="Reference portraits, one person per image; or connect 'ids' instead."),
                IdsType.Input("ids", optional=True, tooltip="Identities from IdGlow Multi-ID Encode (wins over "
                                                            "'references' when both are connected)."),
            ],
            outputs=[io.Float.Output(display_name="facesim_strict", tooltip="Mean over images of sum(sim)/k."),
                     io.Float.Output(display_name="facesim_matched", tooltip="Mean over matched pairs "
                                                                             "(0.0 when nothing matched; see report)."),
                     io.String.Output(display_name="report", tooltip="Per-image matching and scores."),
                     io.Image.Output(display_name="annotated", tooltip="Boxes with reference number and cosine.")])

    @classmethod
    def execute(cls, analyzer, images, references=None, ids=None) -> io.NodeOutput:
        if ids is None:
            refs = collect_references(references, [])
            ids = encode_identities(analyzer, refs)
        generated = image_batch_to_numpy(images, "images")
        summary = score_images(analyzer, ids.embeddings, generated, on_image=progress(len(generated)))
        annotated = [annotate(img, faces, res) for img, faces, res in zip(generated, summary.faces, summary.results)]
        report = summary.report()
        matched = 0.0 if math.isnan(summary.matched) else summary.matched
        return io.NodeOutput(summary.strict, matched, report, numpy_to_image_batch(annotated),
                             ui={"text": [report]})
