"""`layermoe compare`: LayerMoE vs NeuronMoE vs MoE-LPR vs a dense fine-tune on one generation.

    plan.py    the variants and their budgets (what a recipe's `compare:` section asks for)
    run.py     running each variant (its own work dir through the lineage runner) and measuring it
    render.py  the table (compare.json / compare.md / the terminal) and compare.png
"""
