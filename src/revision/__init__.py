"""ReVision pipeline library: data, encoders, embeddings, ReAlign and the MLLM stages.

Importing this package has no side effects and imports nothing; the stage commands live in ``stages/`` (one
thin Typer command per DVC stage). Which module holds what, grouped by the stage it serves, is ``MODULES``
(tests/test_module_map.py checks it against the files); ``PLUMBING`` names the modules that compute no value
a stage writes, which dvc.yaml leaves out of every stage's deps (tests/test_dvc_deps.py).
"""

__version__ = "0.1.0"

MODULES: dict[str, str] = {
    # everywhere
    "layout": "the data contract: folders, manifests and their columns, embedding-set names",
    "config": "one typed config per params.yaml block; params.yaml sets every value",
    "errors": "InputError, the one exception type for bad user input",
    "outputs": "atomic outputs (temporary sibling renamed into place) and resume fingerprints",
    "tracking": "MLflow: one run per stage, nested under one parent run per pipeline run",
    "precision": "what the training and scoring steps compute in: fp32, bf16 autocast, and what auto picks here",
    "encoder_identity": "the one same-encoder check every reader of vectors uses",
    # prepare
    "sources": "the bundled datasets: easy-VQA (pip) and Fashion-MNIST (Debian)",
    "captions": "compositional captions and questions generated from image attributes",
    "userdata": "a user's own data: LLaVA JSON conversations and the ReVision dataset.json",
    "images": "reading image files, with errors naming the file and its manifest row",
    "prepare": "disjoint splits written as the manifests of layout, images under images/",
    # encoder
    "encoders": "dual encoders (lit, open_clip, hf_clip): save, load and identity",
    "contrastive": "training the LiT heads with CLIP's symmetric InfoNCE on precomputed tower features",
    "zeroshot": "the encoder's report: zero-shot classification of eval images and the modality gap",
    # embed
    "embedding_jobs": "manifests through the frozen encoder (or a visual input's reader), sharded, resumable",
    "embedding_sets": "the project's embedding-set format: safetensors shards, ids and an index",
    "stress": "the optional synthetic modality-gap stress on image embeddings",
    # visual
    "visual_input": "what the MLLM reads of an image: the pooled, grid and pixels types, their geometry and projectors",
    "feature_maps": "the image tower's per-location features, pooled to grid x grid cells (grid visual input)",
    # realign
    "embedding_streams": "streamed, normalized readers of any embedding file (.npy, .safetensors, .parquet, sets)",
    "realign": "ReAlign: the training-free map of text embeddings into the image distribution, and its stats",
    "gap": "modality-gap metrics and plots: the gap report",
    "pair_geometry": "alignment geometry on held-out pairs (centroid distance, Phi, Psi, k-NN overlap, mixing, residual)",
    # lm, pretrain, finetune
    "lm": "causal LMs on disk: the bundled SmolLM2 converted, a tiny Llama for tests, one loader",
    "mllm": "the multimodal LM: a visual input's projector + a causal LM; training loss, scoring, generation",
    "conversations": "conversations rendered with the chat template, answer labels, batches with the visual prefix",
    "checkpoints": "MLLM checkpoints: save what was trained, load against the recorded base LM, export",
    "objectives": "the training-objective interface (named batches and losses, param groups, save, rebuild)",
    "training_setup": "what pretrain and finetune train, assembled from params; impossible combinations refused",
    "attention": "bidirectional image-token attention masks (VoRA) and greedy decoding under them",
    "training_data": "what each MLLM stage trains on; stage1_samples is where pretrain.source picks stage 1's input",
    "train": "the training loop of pretrain and finetune, and saving the stage's model, metrics and loss curve",
    "ross": "Ross's reconstructive loss: a small diffusion denoiser on the LM's visual hidden states",
    "vora": "VoRA's stage 1: vision LoRA distilled block by block from a frozen image network",
    # evaluate
    "evaluate": "scoring an MLLM on the held-out eval set: captions, VQA, POPE probes, classes, caption NLL",
    "standard_errors": "the eval metrics' standard errors over items: of a mean, a share, a ratio of sums; bootstrap",
    # study
    "study": "the ablation study: DVC experiments (condition x seed) and their results",
    "ablation_report": "reports/ablation.md: the study's experiments as mean ± sd tables",
    "paired": "seed-paired comparisons: mean difference, its CI and p-value, the smallest detectable difference",
    # outside the pipeline
    "lmms_model": "revision, an lmms-eval model: any checkpoint scored by the community harness",
    "lmms_task": "the eval split as an offline lmms-eval task group, revision_eval",
    "offline_plots": "the dvc plots HTML template with Vega inlined, drawn without a network",
}

# Compute no value a stage writes (params parsing, error types, atomic writes and resume fingerprints, MLflow
# logging, the same-encoder check): dvc.yaml lists none of them as a stage's deps.
PLUMBING: tuple[str, ...] = ("config", "errors", "outputs", "tracking", "encoder_identity")
