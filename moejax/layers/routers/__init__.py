"""Routers: token representations -> ``RoutingResult``.

Every router returns the same typed result, so dispatch, losses and metrics never need to know
which router made it. Routers compute in float32 whatever the model's compute dtype: top-k is
sensitive to ties and small logit differences that bf16 rounds away.

A router is a Linen module with ``from_spec(spec)`` (it reads the ``MoESpec`` fields it needs)
and ``__call__(x, *, deterministic) -> RoutingResult``; its own losses travel in
``RoutingResult.losses``; non-gradient state (a selection bias, a threshold) is a parameter
with a stop-gradient, changed by a delta sown in ``param_updates`` that the train step adds
after the optimiser. A new router is a new file and a line in ``ROUTERS``.
"""
from moejax.layers.routers.batch_choice import ExpertChoiceRouter, ExpertRaceRouter
from moejax.layers.routers.hash import HashRouter
from moejax.layers.routers.result import RoutingResult, router_logits  # noqa: F401
from moejax.layers.routers.recurrent import GRU, RecurrentRouter
from moejax.layers.routers.sigmoid import SigmoidRouter
from moejax.layers.routers.stochastic import StochasticRouter
from moejax.layers.routers.top_p import TopPRouter
from moejax.layers.routers.topk import TopKSoftmaxRouter, topk_softmax  # noqa: F401

# Name -> module. Config validation lists these names in its error message.
ROUTERS = {
    "topk_softmax": TopKSoftmaxRouter,
    "sigmoid": SigmoidRouter,
    "top_p": TopPRouter,
    "expert_choice": ExpertChoiceRouter,
    "expert_race": ExpertRaceRouter,
    "hash": HashRouter,
    "stochastic": StochasticRouter,
    "recurrent": RecurrentRouter,
}
