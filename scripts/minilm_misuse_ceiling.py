"""How far can any simple classifier on MiniLM's activations go on the shipped misuse set?

Issue 13 asks, for misuse on the project's own test split, recall >= 0.90 at <= 1% FPR and
AUROC >= 0.98. The shipped probe reaches 0.926 AUROC (README "Measured on the shipped data").
This script asks whether the probe or the model is the limit: it replays the misuse set through
MiniLM exactly as `pack fit` does (`replay`: turn by turn, the labeled role's tokens, every
layer's output as the capture client hooks it) and fits, on the fit split only, classifiers that
see more than any served probe can:

- a logistic regression on each layer's [mean, max] over the labeled tokens;
- the same on all six layers concatenated (4,608 values per conversation);
- a one-hidden-layer MLP on that concatenation;
- a logistic regression on the sentence embedding all-MiniLM-L6-v2 was trained to produce
  (the last layer's mean over all tokens, L2-normalised);
- a 5-nearest-neighbour vote on that embedding (mean cosine to the 5 nearest harmful minus the
  5 nearest benign fit items).

Regularisation is chosen by cross-validation inside the fit split (scikit-learn's
`LogisticRegressionCV`, or the MLP's early stopping on a part of it); the calibrate split is not
used and nothing is chosen on the test split, which is only scored: test AUROC and recall at
1% FPR read off the test split's own ROC curve (an optimistic operating point: no threshold
is carried over from other data). scikit-learn comes with the `minilm` extra (a dependency of
sentence-transformers); it is not one of the project's dependencies.

Run from the repository root (about 1 minute on 2 cores):
``OMP_NUM_THREADS=1 python scripts/minilm_misuse_ceiling.py [--json]``
"""

from __future__ import annotations

import argparse
import json
import warnings

import numpy as np
import torch

from monitor import datasets
from monitor.features.build.conversations import load_model, replay

LAYERS = range(6)


def _pooled(tokens) -> tuple[np.ndarray, np.ndarray]:
    """[mean, max] of the labeled tokens per layer, concatenated; and the sentence embedding."""
    labeled = tokens.labeled
    per_layer = []
    for i in LAYERS:
        rows = tokens.activations[f"layers.{i}"]
        picked = rows[labeled] if bool(labeled.any()) else rows
        per_layer += [picked.mean(0), picked.max(0).values]
    last = tokens.activations[f"layers.{LAYERS[-1]}"].mean(0)
    return torch.cat(per_layer).numpy(), (last / last.norm()).numpy()


def _recall_at(labels: np.ndarray, scores: np.ndarray, fpr_max: float) -> float:
    from sklearn.metrics import roc_curve

    fpr, tpr, _ = roc_curve(labels, scores)
    return float(max(t for f, t in zip(fpr, tpr, strict=True) if f <= fpr_max))


def main() -> None:
    from sklearn.linear_model import LogisticRegressionCV
    from sklearn.metrics import roc_auc_score
    from sklearn.neural_network import MLPClassifier
    from sklearn.preprocessing import StandardScaler

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args()
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", category=UserWarning)
    warnings.filterwarnings("ignore", module="sklearn")
    model, tokenizer = load_model(None)
    data = [c for c in datasets.load("misuse") if c.split in ("fit", "test")]
    tokens = replay(model, tokenizer, data, list(LAYERS))
    pooled = [_pooled(t) for t in tokens]
    x = np.stack([p[0] for p in pooled])
    emb = np.stack([p[1] for p in pooled])
    y = np.array([c.label for c in data])
    fit = np.array([c.split == "fit" for c in data])
    test = ~fit

    def logistic(z: np.ndarray) -> np.ndarray:
        scaler = StandardScaler().fit(z[fit])
        clf = LogisticRegressionCV(Cs=8, max_iter=3000).fit(scaler.transform(z[fit]), y[fit])
        return clf.decision_function(scaler.transform(z[test]))

    def mlp(z: np.ndarray) -> np.ndarray:
        scaler = StandardScaler().fit(z[fit])
        clf = MLPClassifier(
            (256,), alpha=1e-2, max_iter=500, early_stopping=True, random_state=0
        ).fit(scaler.transform(z[fit]), y[fit])
        return clf.predict_proba(scaler.transform(z[test]))[:, 1]

    def knn(k: int = 5) -> np.ndarray:
        sims = emb[test] @ emb[fit].T
        harmful = np.where(y[fit][None, :] == 1, sims, -np.inf)
        benign = np.where(y[fit][None, :] == 0, sims, -np.inf)
        top = lambda s: np.sort(s, axis=1)[:, -k:].mean(axis=1)  # noqa: E731
        return top(harmful) - top(benign)

    width = x.shape[1] // len(LAYERS)
    candidates = {
        f"logistic [mean,max] layer {i}": (lambda i=i: logistic(x[:, i * width : (i + 1) * width]))
        for i in LAYERS
    }
    candidates["logistic [mean,max] all layers"] = lambda: logistic(x)
    candidates["MLP [mean,max] all layers"] = lambda: mlp(x)
    candidates["logistic sentence embedding"] = lambda: logistic(emb)
    candidates["5-NN sentence embedding"] = knn
    rows = []
    for name, score in candidates.items():
        s = score()
        rows.append(
            {
                "classifier": name,
                "test_auroc": round(float(roc_auc_score(y[test], s)), 3),
                "test_recall_at_1pct_fpr": round(_recall_at(y[test], s, 0.01), 3),
            }
        )
        if not args.json:
            r = rows[-1]
            print(
                f"{name:36s} test AUROC {r['test_auroc']:.3f}  "
                f"recall@1% FPR {r['test_recall_at_1pct_fpr']:.3f}",
                flush=True,
            )
    if args.json:
        counts = {
            "fit": int(fit.sum()),
            "test": int(test.sum()),
            "test_harmful": int(y[test].sum()),
        }
        print(json.dumps({"conversations": counts, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
