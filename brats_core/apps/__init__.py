"""What users run: the method scripts' shared flags and mains (:mod:`.arguments`, :mod:`.scripts`,
:mod:`.rmbts_training`), prediction on new patients (:mod:`.predict`), the paper's table and figures
(:mod:`.report`), the paper's command sequences (:mod:`.reproduce`) and the demo (:mod:`.demo`).
"""
