"""The QM9 network of the NTKMTL/Nash-MTL experiments: an MPNN on padded dense graphs.

Gilmer et al.'s message-passing network as the multi-task QM9 papers use it: a linear
embedding of the atoms (64 units), three rounds of an edge-network convolution (NNConv,
mean aggregation, root weight) each followed by a GRU update, Set2Set readout (3 steps),
a 64-unit dense layer (the shared representation z) and one linear head per target.

Graphs are dense and padded: `nodes` (B, N, F), `node_mask` (B, N), `edges` (B, N, N, E)
and `edge_mask` (B, N, N) (complete graph without self-loops, as the papers' `Complete`
transform). No graph library is needed. The edge network's per-edge (64 x 64) matrices
are never materialised: with hidden edge units u_ij (128), the message
mean_j W(e_ij) h_j is contracted as sum_c u_ijc (A_c h_j) + B h_j, the same function as
NNConv at a fraction of the memory.

References:
  Gilmer et al., "Neural Message Passing for Quantum Chemistry", ICML 2017;
  Navon et al., "Multi-Task Learning as a Bargaining Game", ICML 2022 (the QM9 setup);
  Qin et al., NTKMTL, NeurIPS 2025 (arXiv 2510.18258).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from ntkmtl_jax.models.multitask import LinearHeads, TaskFunctions, task_functions

NUM_TARGETS = 11


class EdgeNetworkConv(nn.Module):
  """NNConv with mean aggregation: x_i W_root + mean_{j in N(i)} W(e_ij) x_j + b.

  W(e) = reshape(Dense(dim * dim)(relu(Dense(hidden)(e)))), contracted without forming W.
  """

  dim: int = 64
  hidden: int = 128

  @nn.compact
  def __call__(self, x, edges, edge_mask):
    d = self.dim
    u = nn.relu(nn.Dense(self.hidden, name="edge_hidden")(edges))  # (B, N, N, H)
    kernel = self.param("edge_kernel", nn.initializers.lecun_normal(), (self.hidden, d * d))
    bias = self.param("edge_bias", nn.initializers.zeros, (d * d,))
    # W(e_ij)[a, o] = sum_c u_ijc kernel[c, a*d + o] + bias[a*d + o]; message_i[o] =
    # sum_a x_j[a] W(e_ij)[a, o] (PyTorch Geometric's x_j @ W convention).
    kernel = kernel.reshape(self.hidden, d, d)
    projected = jnp.einsum("bja,cao->bjco", x, kernel)  # (B, N, H, d)
    mask = edge_mask.astype(x.dtype)
    messages = jnp.einsum("bijc,bjco->bio", u * mask[..., None], projected)
    messages = messages + jnp.einsum("bij,bja,ao->bio", mask, x, bias.reshape(d, d))
    degree = jnp.maximum(jnp.sum(mask, axis=-1, keepdims=True), 1.0)
    root = nn.Dense(d, use_bias=True, name="root")(x)
    return root + messages / degree


class Set2Set(nn.Module):
  """Set2Set readout over the valid nodes of each graph: returns (B, 2 * dim)."""

  dim: int = 64
  steps: int = 3

  @nn.compact
  def __call__(self, x, node_mask):
    batch = x.shape[0]
    lstm = nn.OptimizedLSTMCell(self.dim, name="lstm")
    carry = (jnp.zeros((batch, self.dim), x.dtype), jnp.zeros((batch, self.dim), x.dtype))
    q_star = jnp.zeros((batch, 2 * self.dim), x.dtype)
    valid = node_mask.astype(bool)
    for _ in range(self.steps):
      carry, q = lstm(carry, q_star)
      scores = jnp.einsum("bnd,bd->bn", x, q)
      scores = jnp.where(valid, scores, -jnp.inf)
      # A graph with no valid node (never in QM9) would give NaN; guard with a zero row.
      scores = jnp.where(jnp.any(valid, axis=1, keepdims=True), scores, 0.0)
      attention = jax.nn.softmax(scores, axis=1) * valid
      readout = jnp.einsum("bn,bnd->bd", attention, x)
      q_star = jnp.concatenate([q, readout], axis=-1)
    return q_star


class MPNNEncoder(nn.Module):
  """Shared MPNN encoder: embedding, 3 x (NNConv + GRU), Set2Set, Dense(dim) + ReLU.

  Input `x` is the dict of padded graph arrays (see the module docstring); the output is
  the per-molecule representation z, (B, dim).
  """

  dim: int = 64
  edge_hidden: int = 128
  message_steps: int = 3
  set2set_steps: int = 3

  @nn.compact
  def __call__(self, x, train: bool = True):
    del train  # no dropout or normalisation: the same function in training and evaluation
    nodes, node_mask = x["nodes"], x["node_mask"]
    edges, edge_mask = x["edges"], x["edge_mask"]
    out = nn.relu(nn.Dense(self.dim, name="embed")(nodes))
    hidden = out
    conv = EdgeNetworkConv(self.dim, self.edge_hidden, name="conv")
    gru = nn.GRUCell(self.dim, name="gru")
    b, n, _ = out.shape
    for _ in range(self.message_steps):
      message = nn.relu(conv(out, edges, edge_mask))
      hidden, out = gru(hidden.reshape(b * n, -1), message.reshape(b * n, -1))
      hidden, out = hidden.reshape(b, n, -1), out.reshape(b, n, -1)
    pooled = Set2Set(self.dim, self.set2set_steps, name="set2set")(out, node_mask)
    return nn.relu(nn.Dense(self.dim, name="project")(pooled))


def target_losses(predictions, batch):
  """Mean squared error of each (standardised) target: (B, 11) predictions, batch["y"]."""
  return jnp.mean((predictions - batch["y"]) ** 2, axis=0)


def qm9_functions(num_targets: int = NUM_TARGETS, dim: int = 64) -> TaskFunctions:
  """The pure functions (loss_fn, encode, decode, ...) of the QM9 MPNN.

  The batch holds `graph` (the dict of padded arrays) and `y` (B, num_targets).
  """
  return task_functions(
    MPNNEncoder(dim), LinearHeads(num_targets), target_losses, input_key="graph"
  )
