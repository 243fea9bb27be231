# SPDX-License-Identifier: Apache-2.0
"""Kernel benchmarks: a shared timing harness and one module per family.

Run them all with ``python -m fastlayers bench``.
"""
