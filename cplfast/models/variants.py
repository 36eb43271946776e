"""The PIP and DPPD parts of :class:`cplfast.models.PromptIR`'s forward (kept apart from the backbone).

* PIP: skip i -> ``interaction{i}(skip, prompt{i}(skip))``; the router weights of ``prompt{i}``
  (:class:`cplfast.layers.PromptInPrompt`) are the slot's routing and can be forced.
* DPPD: ``assignment(latent)`` ``(B,T)`` is the routing (or is forced); each slot then draws tokens from
  ``prompt{i}`` and fuses them with ``fusion{i}`` (done in ``PromptIR._slot``).

Auxiliary losses go to ``state.losses`` as ``"<module>.<term>"``, multiplied by ``model.loss_weights[term]``.
"""

from __future__ import annotations

import torch


def _add_loss(model, state, module_name: str, term: str, value: torch.Tensor) -> None:
    weight = model.loss_weights.get(term, 0.0)
    if weight:
        state.losses[f"{module_name}.{term}"] = weight * value


def _universal_prompt_with_routing(generator, skip: torch.Tensor, routing: torch.Tensor) -> torch.Tensor:
    """PromptInPrompt's output for given mixing weights ``(B,T)`` instead of its router's.

    PromptInPrompt mixes its degradation prompts by ``labels`` given as float weights when it is in
    training mode with teacher forcing on; that documented path is used here, whatever the mode.
    """
    saved = generator.training, generator.teacher_forcing, generator.last_aux
    generator.training, generator.teacher_forcing = True, True
    try:
        prompt = generator(skip, labels=routing.to(skip.dtype))
    finally:
        generator.training, generator.teacher_forcing = saved[0], saved[1]
    generator.last_routing = routing
    generator.last_aux = {"orthogonality": generator.last_aux["orthogonality"]}
    return prompt


def pip_skip(model, level: int, skip: torch.Tensor, state) -> torch.Tensor:
    key = f"prompt{level}"
    generator = getattr(model, key)
    if key in state.forced_maps:
        from .promptir import _forced_map

        prompt = _forced_map(key, state.forced_maps[key], skip, generator.prompt_dim)
        routing = state.forced.get(key)
        _add_loss(model, state, key, "orthogonality", generator.orthogonality_loss())
    elif key in state.forced:
        routing = state.forced[key]
        prompt = _universal_prompt_with_routing(generator, skip, routing)
    else:
        prompt = generator(skip, labels=state.labels)
        routing = generator.last_routing
    if key not in state.forced_maps:
        for term, value in generator.last_aux.items():
            _add_loss(model, state, key, term, value)
    if routing is not None:
        state.routing[key] = routing
    state.maps[key] = prompt
    return getattr(model, f"interaction{level}")(skip, prompt)


def dppd_assign(model, latent: torch.Tensor, state) -> None:
    if "assignment" in state.forced:
        assignment = state.forced["assignment"]
    else:
        assignment = model.assignment(latent, labels=state.labels)
        for term, value in model.assignment.last_aux.items():
            _add_loss(model, state, "assignment", term, value)
    for level in (1, 2, 3):
        _add_loss(model, state, f"prompt{level}", "kl", getattr(model, f"prompt{level}").kl_loss())
    state.assignment = assignment
    state.routing["assignment"] = assignment
