# SPDX-License-Identifier: Apache-2.0
"""Kernel benchmarks: a shared timing harness and one module per family (``python -m fastlayers bench``)."""
