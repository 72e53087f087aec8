"""Mixture of experts: a top-k router (load-balancing and z losses, capacity) and expert-parallel dispatch.

Where this sits: a GPT block whose MLP is a :class:`MoE` routes each token to ``top_k`` of ``num_experts``
expert MLPs. Under expert parallelism (``expert_parallel_size = ep``) the strategy calls
:meth:`MoE.shard_experts`, after which each rank of the ep group holds ``num_experts / ep`` experts, and
tokens travel to their experts and back with one ``all_to_all_single`` each way (uneven split sizes,
differentiable through ``torch.distributed.nn.functional``). Nothing loops over tokens; the loop over a
rank's own experts is a handful of matmuls.

Experts live in an ``nn.ModuleDict`` keyed by their *global* index (``experts.5.fc.weight`` on whichever
rank holds expert 5), so parameter names, and checkpoints, do not depend on ep.

Routing groups are sequences: capacity and the load-balancing loss are computed per sequence, so which
tokens are dropped and what the loss is do not depend on how sequences are spread over ranks and
microbatches. Dropped assignments contribute nothing; the token keeps its residual.

The auxiliary losses enter the training loss as sums, like the token loss: a MoE layer adds
``aux_loss_coef * T * sum_over_sequences(aux) + z_loss_coef * sum_over_tokens(z)`` (T tokens per sequence),
and the model divides the total by the global batch's token count. With every token counted that is the
familiar ``coef * mean_sequence(aux) + z_coef * mean_token(z)``. Without pipeline parallel the model adds
the terms to its loss (:meth:`MoE.pop_aux`); under pipeline parallel a layer on an earlier stage cannot
reach the last stage's loss, so its gradient is injected in backward with the pipeline's loss scale
(:attr:`MoE.aux_grad_scale`, set by the runner).
"""

from lightning_par.experts.dispatch import moe_forward
from lightning_par.experts.layer import STAT_FIELDS, MoE
from lightning_par.experts.router import Routing, TopKRouter, check_moe

__all__ = ["MoE", "Routing", "STAT_FIELDS", "TopKRouter", "check_moe", "moe_forward"]
