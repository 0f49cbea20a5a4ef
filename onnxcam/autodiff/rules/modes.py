"""Rule modes: modified backward passes that replace a few standard rules.

Each mode names the ops it changes; every other op keeps its exact rule. Which ops, and why:
only `Relu`, as captum's GuidedBackprop/Deconvolution (hooks on nn.ReLU modules) and
pytorch-grad-cam's GuidedBackpropReLUModel (which swaps ReLU) do. An exported `Relu` node is
what both nn.ReLU and F.relu become, so this is the same set of units. Clip (ReLU6), LeakyRelu,
HardSwish, SiLU and the rest keep their true gradient in these modes, as in those libraries.

- guided (Springenberg et al. 2015, guided backpropagation): only positive gradients pass, and
  only where the unit was active: g_in = relu(g_out) * [x > 0].
- deconvnet (Zeiler & Fergus 2014, as Springenberg et al. formulate it): the backward ReLU acts
  on the gradient alone, ignoring the forward mask: g_in = relu(g_out).
"""

from __future__ import annotations

from ..registry import vjp
from .common import forward_mask_grad

GUIDED = "guided"
DECONVNET = "deconvnet"


@vjp("Relu", mode=GUIDED)
def guided_relu(ctx, node, grads):
    e, y = ctx.emit, node.outputs[0]
    return [forward_mask_grad(ctx, e.op("Greater", y, e.scalar(0.0, y)), e.op("Relu", grads[0]))]


@vjp("Relu", mode=DECONVNET)
def deconvnet_relu(ctx, node, grads):
    return [ctx.emit.op("Relu", grads[0])]
