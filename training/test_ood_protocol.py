"""The OOD protocol's arithmetic on synthetic data (run by `make test-training`; no model needed): the threshold
budget, ECE, temperature fitting and the accept rule mean what the README says they mean."""

import sys
import unittest
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ood_protocol import VAL_BUDGET, accept_threshold, accepted_stats, ece, fit_temperature, softmax, threshold_at_budget  # noqa: E402


class Protocol(unittest.TestCase):
    def test_the_threshold_rejects_the_budgeted_share_of_validation(self):
        s = np.random.default_rng(0).normal(size=5000)
        self.assertAlmostEqual(float((s > threshold_at_budget(s)).mean()), VAL_BUDGET, delta=1 / 5000)

    def test_temperature_scaling_recovers_the_temperature_that_made_the_logits_over_confident(self):
        rng = np.random.default_rng(1)
        true_logits = rng.normal(0, 2.5, (20000, 10))
        labels = np.array([rng.choice(10, p=p) for p in softmax(true_logits)])
        t = fit_temperature(true_logits * 1.5, labels)  # over-confident by 1.5
        self.assertAlmostEqual(t, 1.5, delta=0.05)
        self.assertLess(ece(softmax(true_logits * 1.5, t), labels), ece(softmax(true_logits * 1.5), labels))
        self.assertLess(ece(softmax(true_logits), labels), 0.01, "sampled from its own probabilities: calibrated")

    def test_the_accept_rule_is_the_lowest_confidence_that_keeps_the_target(self):
        conf = np.array([0.99, 0.98, 0.97, 0.96, 0.95, 0.90, 0.90, 0.80, 0.70, 0.60])
        correct = np.array([1, 1, 1, 1, 1, 1, 0, 1, 0, 0], bool)
        ood = np.zeros(10, bool)
        # Top 5: 100% correct; adding the tie at 0.90 (one wrong) gives 6/7 = 85.7%, at 0.80 7/8 = 87.5%.
        self.assertEqual(accept_threshold(conf, correct, ood, 1.0), 0.95)
        self.assertEqual(accept_threshold(conf, correct, ood, 0.87), 0.80)
        # Ties are accepted or refused together: 0.90 would be 6/7 at best.
        self.assertEqual(accept_threshold(conf, correct, ood, 0.86), 0.80)
        # An OOD-rejected image is never accepted and does not count toward the accuracy: without the wrong
        # answer at 0.90, the top 7 are all correct. Coverage is over every image, the OOD-rejected included.
        ood[6] = True
        self.assertEqual(accept_threshold(conf, correct, ood, 1.0), 0.80)
        stats = accepted_stats(conf, correct, ood, 0.80)
        self.assertEqual((stats["accepted"], stats["accuracy"], stats["coverage"]), (7, 1.0, 0.7))


if __name__ == "__main__":
    unittest.main()
