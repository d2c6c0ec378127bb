"""ropebert.shards"""
