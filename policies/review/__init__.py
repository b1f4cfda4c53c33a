"""The review queue's parts, one job each; ``policies.review_queue.ReviewQueue`` composes them."""
