"""Framework integrations: turbo_dist behind the hooks Megatron-core and TorchTitan already have.

    import turbo_dist.integrations.megatron as tdm      # needs `pip install turbo_dist[megatron]`
    tdm.enable(moe_dispatcher=True)                     # flex/deepep dispatcher -> turbo_dist.moe.Buffer

    # TorchTitan: --override.imports turbo_dist.integrations.torchtitan.moe_token_dispatcher
    #             (and turbo_dist.integrations.torchtitan.grouped_experts)

Each submodule imports its framework when it is imported itself; this package never does, so
`import turbo_dist` (and `import turbo_dist.integrations`) work without either framework installed.
"""

__all__ = ["megatron", "torchtitan"]
