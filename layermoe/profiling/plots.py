"""PNG figures of a profile and an allocation (`core.plotting`: Agg backend, matplotlib imported lazily)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from layermoe.core.plotting import pyplot, save_figure
from layermoe.profiling.similarity import pair_means


def plot_profile(
    scores: Sequence[float],
    matrix,
    languages: Sequence[str],
    old: Sequence[str],
    new: Sequence[str],
    path: str | Path,
    neuron_counts: Sequence[int] | None = None,
    neuron_top_n: int | None = None,
) -> Path:
    """S^i per layer (Eq. 9) with its two ingredients: the new-new and new-old mean similarities.

    With `neuron_counts`, the unique language-specific FFN neurons per layer (NeuronMoE) are drawn
    as bars on a second axis, so both allocation signals can be read side by side.
    """

    plt = pyplot()
    new_new, new_old = pair_means(matrix, languages, old, new)
    layers = np.arange(len(scores))
    fig, ax = plt.subplots(figsize=(max(6.0, 0.32 * len(scores) + 3), 4.2), dpi=120)
    ax.plot(layers, scores, "o-", color="black", lw=2, label="$S^i$ (layer score, Eq. 9)")
    if len(new) > 1:
        ax.plot(layers, new_new, "s--", color="tab:blue", alpha=0.8, label=f"new-new ({', '.join(new)})")
    ax.plot(layers, new_old, "^--", color="tab:orange", alpha=0.8, label=f"new-old (vs {', '.join(old)})")
    ax.set_xlabel("layer")
    ax.set_ylabel("mean cosine similarity of HSA")
    ax.set_xticks(layers)
    ax.tick_params(axis="x", labelsize=8)
    ax.grid(alpha=0.3)
    ax.set_title("Layer-wise language similarity\nhigher = more shared with old languages, fewer new experts")
    handles, labels = ax.get_legend_handles_labels()
    if neuron_counts is not None:
        twin = ax.twinx()
        twin.bar(layers, neuron_counts, color="tab:green", alpha=0.25, zorder=0,
                 label=f"language-specific neurons (unique in top {neuron_top_n or '?'}, NeuronMoE)")
        twin.set_ylabel("unique language-specific FFN neurons")
        ax.set_zorder(twin.get_zorder() + 1)  # the similarity lines above the bars
        ax.patch.set_visible(False)
        more_handles, more_labels = twin.get_legend_handles_labels()
        handles, labels = handles + more_handles, labels + more_labels
    ax.legend(handles, labels, fontsize=8, loc="best")
    return save_figure(fig, path)


def plot_allocation(
    experts_per_layer: Sequence[int],
    similarity: Sequence[float] | None,
    classifier_layers: Sequence[int],
    path: str | Path,
    uniform_reference: Sequence[int] | None = None,
    neuron_counts: Sequence[int] | None = None,
) -> Path:
    """Bars of experts per layer (expert 0 included) over the similarity curve; classifier layers hatched.

    With `neuron_counts` (the neuron strategy) the curve is the language-specific neuron count instead.
    """
    plt = pyplot()
    counts = np.asarray(experts_per_layer)
    layers = np.arange(len(counts))
    fig, ax = plt.subplots(figsize=(max(6.0, 0.32 * len(counts) + 3), 4.6), dpi=120)
    from matplotlib.patches import Patch
    from matplotlib.ticker import MaxNLocator

    classifier = set(classifier_layers)
    colors = ["tab:green" if i in classifier else "tab:blue" for i in layers]
    bars = ax.bar(layers, counts, color=colors, alpha=0.75)
    for i, bar in zip(layers, bars):
        if i in classifier:
            bar.set_hatch("//")
    for x, c in zip(layers, counts):
        ax.text(x, c + 0.05, str(int(c)), ha="center", va="bottom", fontsize=7)
    handles = [Patch(color="tab:blue", alpha=0.75, label="experts per layer (incl. expert 0)")]
    if classifier:
        handles.append(Patch(facecolor="tab:green", alpha=0.75, hatch="//", label="+ routing classifier"))
    if uniform_reference is not None:
        (ref,) = ax.step(layers, uniform_reference, where="mid", color="gray", ls=":", lw=1.5, label="uniform baseline")
        handles.append(ref)
    ax.set_xlabel("layer")
    ax.set_ylabel("experts")
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xticks(layers)
    ax.tick_params(axis="x", labelsize=8)
    ax.set_ylim(0, max(counts.max(), max(uniform_reference or [0])) * 1.12 + 0.3)
    if neuron_counts is not None:
        twin = ax.twinx()
        (line,) = twin.plot(layers, neuron_counts, "o-", color="black", lw=1.5, ms=4, label="language-specific neurons")
        twin.set_ylabel("unique language-specific neurons")
        handles.append(line)
    elif similarity is not None:
        twin = ax.twinx()
        (line,) = twin.plot(layers, similarity, "o-", color="black", lw=1.5, ms=4, label="$S^i$ (layer similarity)")
        twin.set_ylabel("layer similarity $S^i$")
        handles.append(line)
    # Below the axes, so it never hides a bar.
    ax.legend(handles=handles, fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=len(handles), frameon=False)
    ax.set_title(f"Expert allocation: {int(counts.sum())} experts, {int((counts - 1).sum())} new")
    return save_figure(fig, path)
