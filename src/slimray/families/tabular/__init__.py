"""The tabular family: an MLP regressor on rows of numeric features (a CSV with a header), with MSE KD and R².

It is the test of the family contract (``slimray.families.recipe``): everything it needs lives in this folder, and
the shared pipeline (``slimray.pipelines.flow``), Train loop, Tune trainable, winner rule, report renderer and Serve
builder run it. Registered in ``slimray.families`` by one line.
"""

from slimray.families import Family

FAMILY = Family(
    name="tabular",
    description="an MLP regressor on rows of numeric features (CSV), R² under an MSE KD",
    config="slimray.families.tabular.config:TabularConfig",
    loader="slimray.families.tabular.config:load_tabular_config",
    stages="slimray.pipelines.flow:FlowStages",
    train_task="slimray.families.tabular.train:TabularTask",
    serve_check="slimray.serving.checks:check_with_codec",
    codec="slimray.families.tabular.codec:TabularCodec",
    artifact_format="slimray.tabular/1",
    artifact_spec="slimray.families.tabular.model:TabularSpec",
    recipe="slimray.families.tabular.recipe:TabularRecipe",
)
