"""ReVision pipeline library: data, encoders, embeddings, ReAlign and the MLLM stages.

Importing this package has no side effects; the stage commands live in ``stages/`` (one thin Typer command
per DVC stage). Which module serves which stage:

- everywhere: ``layout`` (the data contract: folders, manifests and their columns, embedding-set names),
  ``config`` (one typed config per params.yaml block; params.yaml sets every value), and the plumbing
  ``errors``, ``outputs`` (atomic writes, resume fingerprints), ``tracking`` (MLflow stage runs),
  ``encoder_identity`` (the one same-encoder check every reader uses)
- prepare: ``sources`` (bundled easy-VQA, Fashion-MNIST), ``captions``, ``userdata`` (your LLaVA JSON /
  dataset.json), ``prepare`` (disjoint splits into manifests)
- encoder: ``encoders`` (dual encoders, save/load, identity), ``contrastive`` (LiT heads), ``zeroshot``
  (the encoder's report), ``images``
- embed: ``embed`` (manifests through the encoder, sharded across processes, resumable), ``embedding_sets``
  (the project's embedding-set format), ``stress`` (optional synthetic gap stress)
- realign: ``embedding_files`` (streamed readers of any embedding file), ``realign`` (the alignment maps
  and stats files), ``gap`` (the gap report)
- lm, pretrain, finetune: ``lm``, ``mllm`` (projector + LM), ``training_data`` (what each stage trains on;
  ``stage1_samples`` is where ``pretrain.source`` picks stage 1's input), ``train`` (loop and saving)
- evaluate: ``evaluate``; study: ``study``, ``ablation_report``
"""

__version__ = "0.1.0"
