"""
The broker's trial test suite.
"""
