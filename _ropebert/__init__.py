"""ropebert: contrastive pre-training of RoPE BERT text encoders with long-context inference.

Sub-packages: ropebert.model (encoder, export), ropebert.kernels (fused ops), ropebert.shards (data),
ropebert.pipelines (training, evaluation). The `ropebert` console command lives in ropebert.cli.
"""

__version__ = "0.1.0"
