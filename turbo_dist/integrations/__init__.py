"""Framework integrations: turbo_dist behind the hooks Megatron-core and TorchTitan already have.

    import turbo_dist.integrations.megatron as tdm      # needs `pip install -e .[megatron]`
    tdm.enable(moe_dispatcher=True,                     # flex/deepep dispatcher -> turbo_dist.moe.Buffer
               async_tp=True, cp_attention=True,        # SP linears -> turbo_dist.tp, core attention -> .cp
               layer_spec=spec)                         #   (Megatron's hook for those is the layer spec)

    # TorchTitan (`pip install -e .[torchtitan]`), from the job config:
    #   --override.imports turbo_dist.integrations.torchtitan.moe_token_dispatcher   (EP all-to-all)
    #   --override.imports turbo_dist.integrations.torchtitan.grouped_experts        (expert grouped GEMM)
    #   --override.imports turbo_dist.integrations.torchtitan.async_tp_qkv / async_tp_row_linear /
    #                      async_tp_feed_forward                                      (tp_gemm_backend="dist_gemm")

Each submodule imports its framework when it is imported itself; this package never does, so
`import turbo_dist` (and `import turbo_dist.integrations`) work without either framework installed.
"""

__all__ = ["megatron", "torchtitan"]
