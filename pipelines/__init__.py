"""ropebert.pipelines"""
