"""Objectives: small values that map the activations of one batch to one number per image, to be maximised.

An :class:`Objective` is evaluated on an :class:`Activations` (the truncated model's outputs plus the image
before transforms) and returns a tensor (B,): image i's value. The render loop maximises the sum over the batch
and reports the per-image values. Objectives compose like numbers (lucid's algebra): ``a + b``, ``a - b``,
``-a``, ``2 * a``, ``a / 4``, :meth:`Objective.sum` of many (one flat :class:`Sum`, no deep recursion), and
:class:`Batch` restricts one to a single image of the batch. Every objective has a JSON-able ``spec()``
(docs/ARCHITECTURE.md) and :func:`build` turns a spec back into objects; ``str()`` is a derived description.

Kinds (lucid optvis/objectives.py unless noted): neuron, channel, layer (DeepDream), logit, prob (new),
direction and neuron_direction (with lucid's cosine power), interpolate, diversity (Gram-matrix cosine, as a
value to maximise: minus the mean similarity to the other images), alignment; image regularizers l1, l2, tv,
blur, bilateral (an edge-preserving blur) and prior (a learned patch prior's NLL) measure the image (per-pixel
means; lucid sums) and are meant to be subtracted: ``-0.05 * l1``.

Token tensors (N, tokens, C) of vision transformers are first-class targets. Their first ``prefix`` tokens (the
CLS token, a distillation token: ``LayerInfo.prefix_tokens``) are followed by the patch tokens of a grid laid out
like the image. A channel (and a direction) is the mean over the patch tokens; a neuron's place is a token: ``x``
alone is a token index (``x=0``: the CLS token), ``x`` and ``y`` a column and row of the patch grid, neither the
centre patch.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from featureviz import spec as specs

__all__ = [
    "Activations",
    "Objective",
    "Neuron",
    "Channel",
    "Layer",
    "Logit",
    "Prob",
    "Direction",
    "NeuronDirection",
    "Interpolate",
    "Diversity",
    "Alignment",
    "L1",
    "L2",
    "TotalVariation",
    "Blur",
    "Bilateral",
    "PatchPrior",
    "Match",
    "Sum",
    "Scale",
    "Batch",
    "build",
    "walk",
]

LOGITS = None  # layer key of the model's logits (resolved by the render loop)


class Activations:
    """What objectives read: ``acts[layer]`` (catalog name or :data:`LOGITS`) and ``image`` (B, 3, H, W) in [0, 1]
    before transforms."""

    def __init__(self, acts: dict, image: torch.Tensor | None, logits: str | None = None, *,
                 prefixes: dict | None = None, input_size: tuple[int, int] | None = None):
        self._acts = acts
        self.image = image
        self.logits = logits
        self.batch = image.shape[0] if image is not None else next(iter(acts.values())).shape[0]
        self._prefixes = prefixes or {}
        self.input_size = input_size or (tuple(image.shape[-2:]) if image is not None else None)

    def __getitem__(self, layer: str | None) -> torch.Tensor:
        return self._acts[self.logits if layer is None else layer]

    def prefix(self, layer: str | None) -> int:
        """How many tokens before the patch tokens a token layer has (CLS, distillation); 0 when unknown."""
        return self._prefixes.get(layer) or 0


def _positions(z: torch.Tensor) -> torch.Tensor:
    """Activations as (B, C, P): rank 4 (B, C, H, W) -> P = H*W; rank 3 tokens (B, N, C) -> P = N; rank 2 -> P = 1."""
    if z.dim() == 4:
        return z.flatten(2)
    if z.dim() == 3:
        return z.transpose(1, 2)
    if z.dim() == 2:
        return z.unsqueeze(-1)
    return z.reshape(z.shape[0], -1).unsqueeze(-1)


def token_grid(patches: int, size: tuple[int, int] | None) -> tuple[int, int]:
    """(rows, columns) of ``patches`` patch tokens laid out like an input of ``size`` (H, W)."""
    h, w = size or (1, 1)
    columns = max(1, round(math.sqrt(patches * w / h)))
    if patches % columns:
        columns = max(1, round(math.sqrt(patches)))
    if patches % columns:
        return 1, patches
    return patches // columns, columns


def token_index(tokens: int, prefix: int, x: int | None, y: int | None, size) -> int:
    """The token a neuron reads: token ``x`` when only ``x`` is given, else column x, row y of the patch grid
    (default: its centre)."""
    from featureviz.errors import InvalidSpec

    if x is not None and y is None:
        if not 0 <= x < tokens:
            raise InvalidSpec("objective", f"token {x} is outside the {tokens} tokens of this layer at this image "
                                           f"size; use 0 <= x < {tokens} (0 is the first, the CLS token if any)")
        return x
    rows, columns = token_grid(max(tokens - prefix, 1), size)
    x = columns // 2 if x is None else x
    y = rows // 2 if y is None else y
    if not (0 <= x < columns and 0 <= y < rows):
        raise InvalidSpec("objective", f"patch x={x}, y={y} is outside the {columns}x{rows} patch grid of this "
                                       f"layer at this image size; use 0 <= x < {columns}, 0 <= y < {rows}")
    return min(prefix + y * columns + x, tokens - 1)


def _patches(z: torch.Tensor, prefix: int) -> torch.Tensor:
    """The patch tokens (B, N - prefix, C) of a token tensor (all of them when there is no patch token)."""
    return z[:, prefix:] if 0 < prefix < z.shape[1] else z


def _at_token(z: torch.Tensor, acts: "Activations", layer, x, y) -> torch.Tensor:
    """(B, C): the token a neuron reads from a token tensor (B, N, C)."""
    return z[:, token_index(z.shape[1], acts.prefix(layer), x, y, acts.input_size)]


def _at(z: torch.Tensor, x: int | None, y: int | None) -> torch.Tensor:
    """(B, C) activations at column x, row y (default: the centre) of a (B, C, H, W) map; other ranks: the mean."""
    if z.dim() != 4:
        return _positions(z).mean(-1)
    h, w = z.shape[2:]
    x = w // 2 if x is None else x
    y = h // 2 if y is None else y
    if not (0 <= x < w and 0 <= y < h):
        from featureviz.errors import InvalidSpec
        raise InvalidSpec("objective", f"position x={x}, y={y} is outside the {w}x{h} activation map at this "
                                       f"image size; use 0 <= x < {w}, 0 <= y < {h}")
    return z[:, :, y, x]


def _dot_cossim(z: torch.Tensor, vector: torch.Tensor, cossim_pow: float) -> torch.Tensor:
    """(B, C, P) . (C,) -> (B, P): dot product, times max(cos, 0.1) ** cossim_pow when cossim_pow > 0 (lucid)."""
    dot = torch.einsum("bcp,c->bp", z, vector)
    if cossim_pow == 0:
        return dot
    eps = 1e-4
    cos = dot / (eps + z.norm(dim=1)) / (eps + vector.norm())
    return dot * torch.clamp(cos, min=0.1) ** cossim_pow


class Objective:
    """Base class: ``obj(acts) -> (B,)``. Subclasses set ``kind`` (declared in :data:`featureviz.spec.KINDS`),
    keep each declared field as an attribute of the same name (the constructor takes them as keywords) and
    implement ``__call__``; leaves that read activations override ``layers``. ``spec()``, the children, ``layers``
    and ``needs_image`` of composites follow from the declaration."""

    kind = ""

    def __call__(self, acts: Activations) -> torch.Tensor:
        raise NotImplementedError

    def spec(self) -> dict:
        """The normalized spec dict: each declared field, children as their specs."""
        declared = specs.KINDS[self.kind]
        body = {}
        for name, field in declared.fields.items():
            value = getattr(self, name)
            if field.type is specs.OBJECTIVE:
                value = value.spec()
            elif field.type is specs.OBJECTIVES:
                value = [child.spec() for child in value]
            elif isinstance(value, (list, tuple)):
                value = list(value)
            body[name] = value
        return {self.kind: body[declared.bare] if declared.bare else body}

    @property
    def children(self) -> list:
        """The objectives this one composes, in declaration order."""
        out = []
        for name, field in specs.KINDS[self.kind].fields.items():
            if field.type is specs.OBJECTIVE:
                out.append(getattr(self, name))
            elif field.type is specs.OBJECTIVES:
                out.extend(getattr(self, name))
        return out

    @property
    def layers(self) -> tuple:
        """Layer keys this objective reads (None = the logits)."""
        return tuple(layer for child in self.children for layer in child.layers)

    @property
    def needs_image(self) -> bool:
        return any(child.needs_image for child in self.children)

    def __str__(self) -> str:
        return specs.format_objective(self.spec())

    def __repr__(self) -> str:
        return f"<Objective {self}>"

    # algebra
    def __add__(self, other):
        if not isinstance(other, Objective):
            return NotImplemented
        return Sum([self, other])

    def __radd__(self, other):
        if other == 0:  # sum([...]) starts from 0
            return self
        return NotImplemented

    def __sub__(self, other):
        if not isinstance(other, Objective):
            return NotImplemented
        return Sum([self, Scale(-1.0, other)])

    def __neg__(self):
        return Scale(-1.0, self)

    def __mul__(self, factor):
        if isinstance(factor, bool) or not isinstance(factor, (int, float)):
            return NotImplemented
        return Scale(float(factor), self)

    __rmul__ = __mul__

    def __truediv__(self, factor):
        if isinstance(factor, bool) or not isinstance(factor, (int, float)):
            return NotImplemented
        return Scale(1.0 / factor, self)

    @staticmethod
    def sum(objectives) -> "Sum":
        """One flat :class:`Sum` of any number of objectives."""
        return Sum(list(objectives))


class _LayerObjective(Objective):
    def __init__(self, layer: str):
        self.layer = layer

    @property
    def layers(self):
        return (self.layer,)


class Neuron(_LayerObjective):
    kind = "neuron"

    def __init__(self, layer, channel, x=None, y=None):
        super().__init__(layer)
        self.channel, self.x, self.y = channel, x, y

    def __call__(self, acts):
        z = acts[self.layer]
        if z.dim() == 3:
            return _at_token(z, acts, self.layer, self.x, self.y)[:, self.channel]
        return _at(z, self.x, self.y)[:, self.channel]



class Channel(_LayerObjective):
    kind = "channel"

    def __init__(self, layer, channel):
        super().__init__(layer)
        self.channel = channel

    def __call__(self, acts):
        z = acts[self.layer]
        if z.dim() == 3:  # tokens: the mean over the patch tokens
            return _patches(z, acts.prefix(self.layer))[:, :, self.channel].mean(-1)
        return _positions(z)[:, self.channel].mean(-1)



class Layer(_LayerObjective):
    """DeepDream: mean of the squared activations of the whole layer."""

    kind = "layer"

    def __call__(self, acts):
        z = acts[self.layer]
        return z.pow(2).reshape(z.shape[0], -1).mean(-1)



class Logit(Objective):
    kind = "logit"

    def __init__(self, index):
        self.index = index

    @property
    def layers(self):
        return (LOGITS,)

    def __call__(self, acts):
        return acts[LOGITS].reshape(acts.batch, -1)[:, self.index]



class Prob(Logit):
    """Softmax probability p of class ``index``. Its value is p; its gradient is that of log p (the same maximiser):
    the gradient of p itself vanishes with p, and starting near 1/1000 it leaves Adam's sign-like first steps
    to the noise (at lr 0.05, p falls instead of rising)."""

    kind = "prob"

    def __call__(self, acts):
        log_p = torch.log_softmax(acts[LOGITS].reshape(acts.batch, -1), dim=-1)[:, self.index]
        return log_p.exp().detach() + (log_p - log_p.detach())



class Direction(_LayerObjective):
    """Mean over positions of z . vector (times the floored cosine similarity ** cossim_pow)."""

    kind = "direction"

    def __init__(self, layer, vector, cossim_pow=0.0):
        super().__init__(layer)
        self.vector, self.cossim_pow = list(vector), float(cossim_pow)

    def _vector(self, z):
        return torch.as_tensor(self.vector, dtype=z.dtype, device=z.device)

    def __call__(self, acts):
        z = acts[self.layer]
        z = _positions(_patches(z, acts.prefix(self.layer)) if z.dim() == 3 else z)
        return _dot_cossim(z, self._vector(z), self.cossim_pow).mean(-1)



class NeuronDirection(Direction):
    kind = "neuron_direction"

    def __init__(self, layer, vector, x=None, y=None, cossim_pow=0.0):
        super().__init__(layer, vector, cossim_pow)
        self.x, self.y = x, y

    def __call__(self, acts):
        z = acts[self.layer]
        z = (_at_token(z, acts, self.layer, self.x, self.y) if z.dim() == 3 else _at(z, self.x, self.y)).unsqueeze(-1)
        return _dot_cossim(z, self._vector(z), self.cossim_pow)[:, 0]



class Interpolate(Objective):
    """Image i of N maximises (1 - t_i) a + t_i b with t_i = i / (N - 1)."""

    kind = "interpolate"

    def __init__(self, a: Objective, b: Objective):
        self.a, self.b = a, b

    def __call__(self, acts):
        a, b = self.a(acts), self.b(acts)
        n = a.shape[0]
        t = torch.arange(n, device=a.device, dtype=a.dtype) / max(n - 1, 1)
        return (1 - t) * a + t * b



def gram_inner_products(z: torch.Tensor, route: str | None = None) -> torch.Tensor:
    """(B, B) Frobenius products <G_i, G_j> of the Gram matrices G_i = Z_i Z_i^T of ``z`` (B, C, P).

    Two exact routes: ``gram`` forms the B (C, C) matrices (cost B C^2 P); ``kernel`` uses
    <Z_i Z_i^T, Z_j Z_j^T> = |Z_i^T Z_j|^2 and forms the (B P, B P) position kernel instead (cost C (B P)^2),
    which for a late layer (C = 1152, P = 7 x 7) is ~6x fewer flops and never materialises B x 1.3 M Gram entries
    (their normalisation and its backward were most of a diversity step). Default: the cheaper one.
    """
    n, c, p = z.shape
    if route is None:
        route = "kernel" if n * p < c else "gram"
    if route == "kernel":
        y = z.transpose(0, 1).reshape(c, n * p)  # (C, B P): every image's positions side by side
        kernel = (y.T @ y).reshape(n, p, n, p)
        return kernel.pow(2).sum(dim=(1, 3))
    grams = torch.bmm(z, z.transpose(1, 2)).reshape(n, -1)
    return grams @ grams.T


def gram_cosines(z: torch.Tensor, route: str | None = None) -> torch.Tensor:
    """(B, B) cosine similarities of the Gram matrices of ``z`` (B, C, P); an all-zero image has cosine 0."""
    inner = gram_inner_products(z, route)
    norms = inner.diagonal().clamp_min(1e-20).sqrt()  # clamp before the sqrt: finite gradient at 0
    return inner / (norms[:, None] * norms[None, :])


class Diversity(_LayerObjective):
    """Minus the Gram-matrix cosine similarity to the other images: image i gets -sum_{j != i} cos(G_i, G_j) / N,
    with G_i = Z_i Z_i^T over channels (lucid ``diversity`` with the sign for maximisation). Add it with a weight:
    ``channel + 100 * diversity``."""

    kind = "diversity"

    def __call__(self, acts):
        z = _positions(acts[self.layer])  # (B, C, P)
        n = z.shape[0]
        sim = gram_cosines(z)
        off_diagonal = sim.sum(-1) - sim.diagonal()
        return -off_diagonal / n



class Alignment(_LayerObjective):
    """Minus mean((z_i - z_{i+d})^2) / decay^d over neighbours d = 1..4 in the batch (lucid ``alignment``); each
    pair's term is split between its two images."""

    kind = "alignment"

    def __init__(self, layer, decay=2.0):
        super().__init__(layer)
        self.decay = float(decay)

    def __call__(self, acts):
        z = acts[self.layer]
        z = z.reshape(z.shape[0], -1)
        out = torch.zeros(z.shape[0], device=z.device, dtype=z.dtype)
        for d in range(1, min(4, z.shape[0] - 1) + 1):
            term = (z[:-d] - z[d:]).pow(2).mean(-1) / self.decay ** d
            out = out - F.pad(term, (0, d)) / 2 - F.pad(term, (d, 0)) / 2
        return out



class _ImageObjective(Objective):
    @property
    def needs_image(self):
        return True


class L1(_ImageObjective):
    """mean |image - constant| per image."""

    kind = "l1"

    def __init__(self, constant=0.5):
        self.constant = float(constant)

    def __call__(self, acts):
        return (acts.image - self.constant).abs().flatten(1).mean(-1)



class L2(L1):
    """sqrt(mean (image - constant)^2) per image (lucid's L2 is the norm)."""

    kind = "l2"

    def __call__(self, acts):
        return ((acts.image - self.constant).pow(2).flatten(1).mean(-1) + 1e-12).sqrt()



class TotalVariation(_ImageObjective):
    """mean |dx| + mean |dy| of the image, per image."""

    kind = "tv"

    def __call__(self, acts):
        x = acts.image
        dx = (x[..., :, 1:] - x[..., :, :-1]).abs().flatten(1).mean(-1)
        dy = (x[..., 1:, :] - x[..., :-1, :]).abs().flatten(1).mean(-1)
        return dx + dy



class Blur(_ImageObjective):
    """0.5 * mean (image - stopgrad(blur3x3(image)))^2 (lucid ``blur_input_each_step``); subtracting it pulls the
    image towards its own blur."""

    kind = "blur"

    def __call__(self, acts):
        x = acts.image
        c = x.shape[1]
        kernel = torch.tensor([[1.0, 2.0, 1.0], [2.0, 4.0, 2.0], [1.0, 2.0, 1.0]], device=x.device, dtype=x.dtype)
        kernel = (kernel / kernel.sum()).expand(c, 1, 3, 3)
        with torch.no_grad():
            blurred = F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), kernel, groups=c)
        return 0.5 * (x - blurred).pow(2).flatten(1).mean(-1)



class Bilateral(_ImageObjective):
    """0.5 * mean (image - stopgrad(bilateral(image)))^2: like :class:`Blur`, an edge-preserving pull towards a
    smoothed image (Tomasi and Manduchi 1998): each pixel becomes the mean of its neighbours within ~2
    ``sigma_space`` pixels, weighted by a Gaussian of their distance and of their colour difference (``sigma_color``
    in [0, 1] image units), so noise and texture are smoothed and edges between regions are kept."""

    kind = "bilateral"

    def __init__(self, sigma_space=1.0, sigma_color=0.1):
        self.sigma_space, self.sigma_color = float(sigma_space), float(sigma_color)

    def __call__(self, acts):
        x = acts.image
        with torch.no_grad():
            smooth = bilateral_filter(x, self.sigma_space, self.sigma_color)
        return 0.5 * (x - smooth).pow(2).flatten(1).mean(-1)


def bilateral_filter(x: torch.Tensor, sigma_space: float, sigma_color: float) -> torch.Tensor:
    """Bilateral filter of ``x`` (B, C, H, W) over a (2r+1)^2 window, r = ceil(2 sigma_space); the colour weight
    uses the squared distance summed over channels; borders are replicated."""
    r = max(1, math.ceil(2 * sigma_space))
    padded = F.pad(x, (r, r, r, r), mode="replicate")
    h, w = x.shape[-2:]
    total = torch.zeros_like(x)
    weights = torch.zeros_like(x[:, :1])
    for dy in range(-r, r + 1):
        for dx in range(-r, r + 1):
            space = math.exp(-(dx * dx + dy * dy) / (2 * sigma_space * sigma_space))
            if space < 1e-3:
                continue
            shifted = padded[:, :, r + dy:r + dy + h, r + dx:r + dx + w]
            weight = space * torch.exp(-(shifted - x).pow(2).sum(1, keepdim=True) / (2 * sigma_color * sigma_color))
            total += weight * shifted
            weights += weight
    return total / weights


class PatchPrior(_ImageObjective):
    """The learned patch prior of an image set (EPLL, Zoran and Weiss 2011; :mod:`featureviz.engine.priors`): the
    mean over each image's patches of their negative log-likelihood under the set's Gaussian mixture, per pixel value
    (nats). Meant to be subtracted: ``channel - 0.1 * prior:DATASET``. ``dataset`` only names the set; the fitted
    mixture is bound by :func:`featureviz.engine.validate` through the spec's resolver (``RenderSpec.patch_priors``),
    so no name ever reaches a path or code."""

    kind = "prior"

    def __init__(self, dataset, prior=None):
        self.dataset = dataset
        self.prior = prior  # a featureviz.engine.priors.PatchPrior, bound at validation

    def __call__(self, acts):
        if self.prior is None:
            from featureviz.errors import InvalidSpec
            raise InvalidSpec("objective.prior.dataset", f"the prior of image set {self.dataset!r} was not resolved; "
                                                         "pass RenderSpec.patch_priors (--prior-images locally)")
        return self.prior.nll(acts.image)


# --- exemplar matching (VITAL, ICCV 2025; issue 25 item 4) ------------------------------------------------------


class Match(Objective):
    """Exemplar matching (VITAL: "More Understandable Feature Visualization through Distribution Alignment", ICCV
    2025): per image, the mean over channels and sorted positions of (sort(z_c) - target_c)^2, z the render's
    features at ``match_layer`` (default ``layer``) and target_c the sorted features of unit ``layer:channel``'s
    top-``k`` dataset examples (exemplar index ``index``), resampled to the render's count of positions: a 1-D
    optimal transport (sorted matching) distance per channel, differentiable through the sort. Meant to be
    subtracted: ``LAYER:C - 0.5*match:LAYER:C@INDEX``. The targets (:class:`featureviz.engine.matching.MatchTargets`)
    are bound by :func:`featureviz.engine.validate` through ``RenderSpec.match_targets``."""

    kind = "match"

    def __init__(self, layer, channel, index, k=8, match_layer=None, targets=None):
        self.layer, self.channel, self.index, self.k, self.match_layer = layer, channel, index, k, match_layer
        self.targets = targets  # a featureviz.engine.matching.MatchTargets, bound at validation

    @property
    def read_layer(self):
        return self.match_layer or self.layer

    @property
    def layers(self):
        return (self.read_layer,)

    def __call__(self, acts):
        if self.targets is None:
            from featureviz.errors import InvalidSpec
            raise InvalidSpec("objective.match.index", f"the exemplar targets of index {self.index!r} were not "
                                                       "resolved; pass RenderSpec.match_targets")
        z = acts[self.read_layer]
        z = _positions(_patches(z, acts.prefix(self.read_layer)) if z.dim() == 3 else z)  # (B, C, P)
        ordered = z.sort(dim=-1).values
        target = self.targets.at(ordered.shape[-1], device=ordered.device, dtype=ordered.dtype)
        return (ordered - target).pow(2).flatten(1).mean(-1)


class Sum(Objective):
    """A flat sum: adding to a Sum makes a new flat Sum, so long sums never nest."""

    kind = "sum"

    def __init__(self, terms):
        flat = []
        for term in terms:
            if isinstance(term, Sum):
                flat.extend(term.terms)
            elif isinstance(term, Objective):
                flat.append(term)
            else:
                raise TypeError(f"can only sum objectives, got {type(term).__name__}")
        if not flat:
            raise ValueError("an empty sum has no objective")
        self.terms = flat

    def __call__(self, acts):
        total = self.terms[0](acts)
        for term in self.terms[1:]:
            total = total + term(acts)
        return total



class Scale(Objective):
    kind = "scale"

    def __init__(self, factor: float, objective: Objective):
        if isinstance(objective, Scale):  # k * (m * a) = (k m) * a
            factor, objective = factor * objective.factor, objective.objective
        self.factor, self.objective = float(factor), objective

    def __call__(self, acts):
        return self.factor * self.objective(acts)



class Batch(Objective):
    """``objective`` for image ``index`` of the batch only (0 for the others)."""

    kind = "batch"

    def __init__(self, index: int, objective: Objective):
        self.index, self.objective = index, objective

    def __call__(self, acts):
        values = self.objective(acts)
        mask = torch.zeros_like(values)
        mask[self.index] = 1.0
        return values * mask



def walk(objective: Objective):
    """Every node of an objective tree, parents before children (iterative: long sums are fine)."""
    stack = [objective]
    while stack:
        node = stack.pop()
        yield node
        stack.extend(reversed(node.children))


def build(spec: dict | Objective, path: str = "objective", *, normalized: bool = False) -> Objective:
    """An objective from a spec dict (checked with :func:`featureviz.spec.normalize_objective`, unless
    ``normalized`` says it is that function's result already) or an Objective."""
    if isinstance(spec, Objective):
        return spec
    return _build(spec if normalized else specs.normalize_objective(spec, path))


def engine_class(kind: specs.Kind) -> type:
    """The class a declared kind names (by name in this module, or the class itself)."""
    return kind.engine if isinstance(kind.engine, type) else globals()[kind.engine]


def _build(spec: dict) -> Objective:
    (name, body), = spec.items()
    kind = specs.KINDS[name]
    if kind.bare:
        body = {kind.bare: body}
    args = {}
    for field_name, field in kind.fields.items():
        value = body[field_name]
        if field.type is specs.OBJECTIVE:
            value = _build(value)
        elif field.type is specs.OBJECTIVES:
            value = [_build(child) for child in value]
        args[field_name] = value
    return engine_class(kind)(**args)
