"""Integrations with other libraries. Each lives in its own submodule, imported on demand, so that
`import specops` never imports them:

    specops.integrations.peft     apply(model) / revert(model): run an existing HF PEFT model's LoKr
                                  and LoHa layers through specops ops, in place, outputs unchanged.
    specops.integrations.lycoris  apply(network) / revert(network): the same for an existing LyCORIS
                                  network's LoKr, LoHa and diag-OFT modules.
"""
